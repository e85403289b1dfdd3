#!/bin/bash
# build-images.sh OUTDIR — the test disk images, byte-for-byte reproducible.
#
#   v1.img      source image (64 MiB)     v2.img  target image (80 MiB)
#   v2-bad.img  v2 whose /sbin/init fails (prints "init-FAILED"), for fallback tests
#   v2-noinit.img  v2 without /sbin/init: cannot boot at all (the initramfs says
#               "no-init-on-root"; with sbinit.panic=1 the guest kernel panics)
# Each is a raw disk: MBR (sfdisk) with one bootable Linux partition at 1 MiB holding an
# ext4 root filesystem, built as a separate file with `mkfs.ext4 -d` and dd'd into place
# (no loop devices). Root holds static busybox + applet links, guest/image-init as
# /sbin/init, a manifest of every file's sha256, and deterministic pseudo-random "binaries"
# and data, mostly shared between v1 and v2, some changed, removed or added, like an OS
# upgrade. OUTDIR/images.sha256 lists the image sums; OUTDIR/images.env the layout.
#
# Env: SB_IMAGE_SEED (content seed), SOURCE_DATE_EPOCH (all timestamps). Same inputs,
# same bytes: fixed UUIDs, hash seed, label ids and times. Cached via OUTDIR/.stamp.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: build-images.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)

seed=${SB_IMAGE_SEED:-streamboot-test-1}
epoch=${SOURCE_DATE_EPOCH:-1700000000}
v1_mib=64
v2_mib=80
part_start_mib=1 # partition 1 starts at 1 MiB (sector 2048)

log() { echo "build-images: $*" >&2; }
die() {
	echo "build-images: error: $*" >&2
	exit 1
}
for t in mkfs.ext4 debugfs sfdisk perl busybox cksum dd truncate; do
	command -v "$t" >/dev/null || die "$t not found (run vm-tests/setup.sh)"
done
busybox=$(command -v busybox)

stamp=$({
	echo "v1 $seed $epoch $v1_mib $v2_mib $(mkfs.ext4 -V 2>&1 | head -n1)"
	sha256sum "$here/build-images.sh" "$here/guest/image-init" "$here/guest/image-init-bad" \
		"$busybox" | cut -c1-64 # contents only: the same whatever the paths
} | sha256sum | cut -d' ' -f1)
if [[ -f $out/.stamp && $(cat "$out/.stamp") == "$stamp" ]] &&
	[[ -f $out/v1.img && -f $out/v2.img && -f $out/v2-bad.img && -f $out/v2-noinit.img ]]; then
	log "up to date ($out)"
	exit 0
fi

tmp=$(mktemp -d "$out/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
umask 022

# gen NAME SIZE [MASK] — SIZE deterministic pseudo-random bytes (xorshift64) seeded from
# the global seed and NAME. MASK (e.g. 0x3f) lowers the entropy of every byte so the file
# compresses somewhat, like real binaries; default: incompressible.
gen() {
	local s
	s=$(printf '%s/%s' "$seed" "$1" | cksum | cut -d' ' -f1)
	perl -e '
		my ($s, $n, $m) = @ARGV;
		my $mask = hex($m) * 0x0101010101010101;
		my $x = $s | (($s ^ 0x5bd1e995) << 32);
		my $out = "";
		for (my $i = 0; $i < $n; $i += 8) {
			$x ^= $x << 13; $x ^= $x >> 7; $x ^= $x << 17;
			$out .= pack("Q<", $x & $mask);
		}
		print substr($out, 0, $n);
	' "$s" "$2" "${3:-0xff}"
}

# A file of size SIZE at ROOT/PATH (mode 0755 for .so "binaries").
put() { # put ROOT PATH SIZE [MASK] [SEEDNAME]
	mkdir -p "$(dirname "$1/$2")"
	gen "${5:-$2}" "$3" "${4:-}" >"$1/$2"
	[[ $2 != *.so ]] || chmod 0755 "$1/$2"
}

# Library sizes: varied, not block-aligned; 16 of them, ≈ 5 MiB in all.
lib_size() { echo $((49152 * (1 + ($1 * 5) % 11) + $1 * 937)); }

# populate ROOT VERSION — the tree of one image version.
populate() {
	local r=$1 v=$2 i
	mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc/sb,dev,proc,sys,run,tmp,root,mnt,var/lib/sb}
	chmod 1777 "$r/tmp"
	chmod 0700 "$r/root"
	cp "$busybox" "$r/bin/busybox"
	while read -r applet; do
		case "$applet" in sbin/init | linuxrc | bin/busybox) continue ;; esac
		ln -sf /bin/busybox "$r/$applet"
	done < <("$busybox" --list-full)
	install -m 0755 "$here/guest/image-init" "$r/sbin/init"

	cat >"$r/etc/os-release" <<-EOF
		NAME="streamboot test image"
		ID=sbtest
		VERSION="$v"
		VERSION_ID=$v
		PRETTY_NAME="streamboot test image $v"
	EOF
	echo "sbtest" >"$r/etc/hostname"
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
	printf 'root:x:0:\n' >"$r/etc/group"

	# Shared: identical bytes in both versions.
	for i in $(seq -w 0 15); do
		case "$i" in 05 | 11) continue ;; esac
		put "$r" "usr/lib/sb/lib$i.so" "$(lib_size "$((10#$i))")" 0x3f
	done
	put "$r" usr/share/sb/blob.bin $((4 * 1048576))
	put "$r" usr/share/sb/table.dat $((2 * 1048576 + 12345)) 0x0f
	put "$r" var/lib/sb/state.db $((256 * 1024)) 0x1f

	# lib05.so: patched in place in v2 (same size, 8 KiB differ) — a small update.
	put "$r" usr/lib/sb/lib05.so "$(lib_size 5)" 0x3f
	# lib11.so: rebuilt in v2 (all bytes differ, 37% larger) — a big update.
	if [[ $v == 1 ]]; then
		put "$r" usr/lib/sb/lib11.so "$(lib_size 11)" 0x3f
	else
		gen lib05.so-patch 8192 0x3f |
			dd of="$r/usr/lib/sb/lib05.so" bs=1 seek=100000 conv=notrunc status=none
		put "$r" usr/lib/sb/lib11.so $(($(lib_size 11) * 137 / 100)) 0x3f lib11.so@v2
	fi

	# Removed in v2 / added in v2.
	if [[ $v == 1 ]]; then
		put "$r" usr/lib/sb/legacy.so $((300 * 1024 + 77)) 0x3f
		put "$r" usr/share/sb/old-data.bin $((1024 * 1024))
	else
		put "$r" usr/lib/sb/feature.so $((600 * 1024 + 5)) 0x3f
		put "$r" usr/share/sb/new-data.bin $((1536 * 1024))
		printf 'feature=on\n' >"$r/etc/sb/feature.conf"
	fi
	{
		echo "# sbtest configuration, version $v"
		echo "version=$v"
		echo "threads=$((v * 2))"
	} >"$r/etc/sb/config"
	mkdir -p "$r/usr/share/doc/sb"
	for i in $(seq 1 "$v"); do echo "version $i: test release $i"; done >"$r/usr/share/doc/sb/CHANGES"

	# Boot working set read before STREAMBOOT-READY (sbtest.ready).
	{
		echo bin/busybox
		echo etc/os-release
		echo etc/sb/config
		echo usr/lib/sb/lib00.so
		echo usr/lib/sb/lib01.so
		echo usr/lib/sb/lib05.so
		echo usr/lib/sb/lib11.so
		[[ $v == 1 ]] && echo usr/lib/sb/legacy.so || echo usr/lib/sb/feature.so
		echo var/lib/sb/state.db
	} >"$r/etc/sb/bootset"
}

# manifest ROOT — sha256 of every regular file (paths relative to /, sorted), written
# last into /etc/manifest.sha256 (which is not listed in itself).
manifest() {
	(cd "$1" && find . -type f ! -path ./etc/manifest.sha256 -printf '%P\n' | LC_ALL=C sort |
		xargs -d '\n' sha256sum) >"$tmp/manifest"
	mv "$tmp/manifest" "$1/etc/manifest.sha256"
}

# mkimage ROOT DISK SIZE_MIB ID — the disk image. ID (1 byte, hex) makes the MBR label id
# and the filesystem UUID distinct per image but fixed across runs.
mkimage() {
	local r=$1 disk=$2 mib=$3 id=$4 fs=$tmp/fs.img
	local fs_kib=$(((mib - part_start_mib) * 1024))
	# Every timestamp the tree can carry, fixed (mke2fs -d copies atime/mtime/ctime; ctime
	# is set below through debugfs since touch cannot set it).
	find "$r" -exec touch -h -d "@$epoch" {} +
	rm -f "$fs"
	: >"$fs"
	# LC_ALL=C: mke2fs -d adds directory entries in alphasort (strcoll) order.
	LC_ALL=C E2FSPROGS_FAKE_TIME=$epoch mkfs.ext4 -q -F -t ext4 -b 4096 -I 256 -L sbroot \
		-U "5b5b5b5b-0000-4000-8000-0000000000$id" \
		-E "root_owner=0:0,hash_seed=5b5b5b5b-0000-4000-8000-5eed000000$id,lazy_itable_init=0,lazy_journal_init=0" \
		-d "$r" "$fs" "${fs_kib}k"
	fix_times "$fs" "$r"

	rm -f "$disk"
	truncate -s "${mib}M" "$disk"
	sfdisk -q --no-reread --no-tell-kernel "$disk" >/dev/null <<-EOF
		label: dos
		label-id: 0x5b5b00$id
		unit: sectors
		start=$((part_start_mib * 2048)), type=83, bootable
	EOF
	dd if="$fs" of="$disk" bs=1M seek="$part_start_mib" conv=notrunc,sparse status=none
	rm -f "$fs"
}

# fix_times FS ROOT — set the ctime of every inode to the fixed epoch: mke2fs copies the
# staging tree's ctimes, which are the time of this run (touch cannot set them).
fix_times() {
	local fs=$1 r=$2
	(cd "$r" && find . -printf '%P\n') | LC_ALL=C sort |
		awk -v t="@$epoch" '{ printf "sif \"/%s\" ctime %s\n", $0, t }' >"$tmp/debugfs.cmds"
	E2FSPROGS_FAKE_TIME=$epoch debugfs -w -f "$tmp/debugfs.cmds" "$fs" >"$tmp/debugfs.log" 2>&1
	if grep -v '^debugfs' "$tmp/debugfs.log" | grep -q .; then
		die "debugfs: $(grep -v '^debugfs' "$tmp/debugfs.log" | head -n3)"
	fi
}

rm -f "$out"/{v1,v2,v2-bad,v2-noinit}.img
populate "$tmp/v1" 1
manifest "$tmp/v1"
mkimage "$tmp/v1" "$tmp/v1.img" "$v1_mib" 01

populate "$tmp/v2" 2
manifest "$tmp/v2"
mkimage "$tmp/v2" "$tmp/v2.img" "$v2_mib" 02

# v2-bad: the v2 tree with a failing init (manifest regenerated to match). The init is
# padded with a comment to the good one's size, so that file layout stays that of v2.
install -m 0755 "$here/guest/image-init-bad" "$tmp/v2/sbin/init"
pad=$(($(stat -c %s "$here/guest/image-init") - $(stat -c %s "$tmp/v2/sbin/init") - 2))
((pad < 0)) || printf '#%*s\n' "$pad" '' >>"$tmp/v2/sbin/init"
manifest "$tmp/v2"
mkimage "$tmp/v2" "$tmp/v2-bad.img" "$v2_mib" 03

# v2-noinit: the v2 tree with no /sbin/init at all (a broken upgrade that cannot boot).
rm "$tmp/v2/sbin/init"
manifest "$tmp/v2"
mkimage "$tmp/v2" "$tmp/v2-noinit.img" "$v2_mib" 04

mv "$tmp"/{v1,v2,v2-bad,v2-noinit}.img "$out/"
(cd "$out" && sha256sum v1.img v2.img v2-bad.img v2-noinit.img) >"$out/images.sha256"
cat >"$out/images.env" <<EOF
# Layout of the images made by build-images.sh (partition 1 = ext4 root, /dev/vda1).
PART_OFFSET=$((part_start_mib * 1048576))
V1_SIZE=$((v1_mib * 1048576))
V2_SIZE=$((v2_mib * 1048576))
EOF
echo "$stamp" >"$out/.stamp"
log "built in $out:"
sed 's/^/  /' "$out/images.sha256" >&2
