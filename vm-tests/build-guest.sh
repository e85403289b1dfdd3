#!/bin/bash
# build-guest.sh OUTDIR — guest kernel + initramfs for direct kernel boot.
#
# OUTDIR/vmlinux          uncompressed ELF kernel (PVH entry; QEMU boots it with -kernel and
#                         skips ≈3 s of in-guest xz decompression under TCG), or
# OUTDIR/bzImage          the packaged kernel when extraction is impossible;
# OUTDIR/initramfs.cpio.gz busybox + virtio/ext4 modules + guest/initramfs-init as /init;
# OUTDIR/guest.env        KVER, KERNEL (absolute path), KERNEL_KIND, INITRD for lib.sh.
#
# Env: KVER (default: the kernel linux-image-amd64 depends on, else the newest one);
# SB_NO_VMLINUX=1 forces the bzImage.
# Cached: nothing is rebuilt while the inputs' fingerprint (OUTDIR/.stamp) is unchanged.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:?usage: build-guest.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)

log() { echo "build-guest: $*" >&2; }
die() {
	echo "build-guest: error: $*" >&2
	exit 1
}

if [[ -z ${KVER:-} ]]; then
	# The kernel linux-image-amd64 points at; else the newest installed one.
	KVER=$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null |
		sed -n 's/^linux-image-\([^ ,]*\).*/\1/p')
	if [[ -z $KVER || ! -r /boot/vmlinuz-$KVER ]]; then
		newest=$(find /boot -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sort -V | tail -n1)
		[[ -n $newest ]] || die "no /boot/vmlinuz-* (install linux-image-amd64: run setup.sh)"
		KVER=${newest#vmlinuz-}
	fi
fi
vmlinuz=/boot/vmlinuz-$KVER
moddir=/lib/modules/$KVER
[[ -r $vmlinuz ]] || die "$vmlinuz not readable"
[[ -r $moddir/modules.dep ]] || die "$moddir/modules.dep missing"
busybox=$(command -v busybox || true)
[[ -n $busybox ]] || die "busybox not found (install busybox-static)"
# The initramfs has no libc: the busybox must be static.
if command -v readelf >/dev/null && readelf -d "$busybox" 2>/dev/null | grep -q NEEDED; then
	die "$busybox is dynamically linked (install busybox-static)"
fi

# Fingerprint of every input; equal fingerprint + outputs present = nothing to do.
stamp=$({
	echo "v1 $KVER ${SB_NO_VMLINUX:-0}"
	sha256sum "$vmlinuz" "$busybox" "$here/build-guest.sh" "$here/guest/initramfs-init" \
		"$moddir/modules.dep" | cut -c1-64 # contents only: the same whatever the paths
} | sha256sum | cut -d' ' -f1)
# guest.env for lib.sh; rewritten even when up to date, in case OUTDIR was moved.
write_env() {
	local kind=vmlinux
	[[ -f $out/vmlinux ]] || kind=bzImage
	cat >"$out/guest.env" <<-EOF
		KVER=$KVER
		KERNEL=$out/$kind
		KERNEL_KIND=$kind
		INITRD=$out/initramfs.cpio.gz
	EOF
}
if [[ -f $out/.stamp && $(cat "$out/.stamp") == "$stamp" && -f $out/initramfs.cpio.gz ]] &&
	[[ -f $out/vmlinux || -f $out/bzImage ]]; then
	write_env
	log "up to date ($out)"
	exit 0
fi

tmp=$(mktemp -d "$out/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- kernel -------------------------------------------------------------------------
# The bzImage payload is an xz stream (CONFIG_KERNEL_XZ): find its magic, decompress, and
# keep the result if it is an ELF. PVH boot also needs CONFIG_PVH (the Xen PHYS32 note).
extract_vmlinux() {
	local offsets off
	grep -q '^CONFIG_PVH=y' "/boot/config-$KVER" 2>/dev/null || return 1
	offsets=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$vmlinuz" | cut -d: -f1) || return 1
	for off in $offsets; do
		if xz -dc --single-stream < <(tail -c +"$((off + 1))" "$vmlinuz") >"$tmp/vmlinux" 2>/dev/null &&
			[[ $(head -c 4 "$tmp/vmlinux" | od -An -c | tr -d ' ') == '177ELF' ]]; then
			return 0
		fi
	done
	return 1
}
rm -f "$out/vmlinux" "$out/bzImage"
if [[ ${SB_NO_VMLINUX:-0} != 1 ]] && command -v xz >/dev/null && extract_vmlinux; then
	mv "$tmp/vmlinux" "$out/vmlinux"
	kind=vmlinux
else
	[[ ${SB_NO_VMLINUX:-0} == 1 ]] && why="SB_NO_VMLINUX=1" || why="no PVH vmlinux could be extracted"
	log "using the compressed bzImage ($why)"
	cp "$vmlinuz" "$out/bzImage"
	kind=bzImage
fi

# --- modules ------------------------------------------------------------------------
# Resolve the closure of the wanted modules from modules.dep (hard deps) and
# modules.softdep "pre:" entries (resolved through modules.alias; those are optional),
# and emit them in load order (dependencies first).
declare -A mpath=() mdeps=() msoft=() seen=()
norm() { local n=${1##*/}; n=${n%%.ko*}; echo "${n//-/_}"; }
while IFS= read -r line; do
	file=${line%%:*}
	name=$(norm "$file")
	mpath[$name]=$file
	mdeps[$name]=${line#*:}
done <"$moddir/modules.dep"
if [[ -r $moddir/modules.softdep ]]; then
	while read -r kw mod rest; do
		[[ $kw == softdep ]] || continue
		pre=${rest#*pre:}
		[[ $pre != "$rest" ]] || continue
		pre=${pre%%post:*}
		msoft[$(norm "$mod")]=$pre
	done <"$moddir/modules.softdep"
fi
alias_targets() { awk -v a="$1" '$1 == "alias" && $2 == a { print $3 }' "$moddir/modules.alias"; }

# Hard closure first: these modules are required, whatever else pulls them in.
declare -A req=()
need() {
	local name=$1 d
	[[ -n ${mpath[$name]:-} && -z ${req[$name]:-} ]] || return 0
	req[$name]=1
	for d in ${mdeps[$name]}; do need "$(norm "$d")"; done
}
order=()
visit() { # depth-first, dependencies (soft "pre:" ones too) before the module itself
	local name=$1 d s t
	[[ -z ${seen[$name]:-} ]] || return 0
	seen[$name]=1
	if [[ -z ${mpath[$name]:-} ]]; then
		# Built into the kernel, or an optional alias with no module: nothing to load.
		[[ -z ${req[$name]:-} ]] || grep -q "/$name.ko" "$moddir/modules.builtin" ||
			log "warning: module $name not found"
		return 0
	fi
	for s in ${msoft[$name]:-}; do
		if [[ -n ${mpath[$(norm "$s")]:-} ]]; then
			visit "$(norm "$s")"
		else
			for t in $(alias_targets "$s"); do visit "$(norm "$t")"; done
		fi
	done
	for d in ${mdeps[$name]}; do visit "$(norm "$d")"; done
	order+=("$([[ -n ${req[$name]:-} ]] || echo '?')${mpath[$name]}")
}
# virtio_pci for q35 (vhost-user-blk-pci), virtio_mmio for microvm, ext4 for the root.
wanted=(virtio_pci virtio_mmio virtio_blk ext4)
for m in "${wanted[@]}"; do
	need "$m"
	[[ -n ${mpath[$m]:-} ]] || grep -q "/$m.ko" "$moddir/modules.builtin" || die "module $m not found"
done
for m in "${wanted[@]}"; do visit "$m"; done

# --- initramfs tree -----------------------------------------------------------------
root=$tmp/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,newroot,lib/modules}
cp "$busybox" "$root/bin/busybox"
# Applet symlinks at build time (cheaper than busybox --install under TCG).
while read -r applet; do
	case "$applet" in sbin/init | linuxrc | bin/busybox) continue ;; esac
	ln -sf /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)
install -m 0755 "$here/guest/initramfs-init" "$root/init"
# Modules are stored uncompressed: busybox insmod and the kernel need no decompressor.
: >"$root/lib/modules/load.list"
for e in "${order[@]}"; do
	rel=${e#\?}
	src=$moddir/$rel
	dst=${rel%.xz}
	dst=${dst%.zst}
	dst=${dst%.gz}
	mkdir -p "$root/lib/modules/$(dirname "$dst")"
	case "$rel" in
	*.xz) xz -dc "$src" >"$root/lib/modules/$dst" ;;
	*.zst) zstd -q -dc "$src" >"$root/lib/modules/$dst" ;;
	*.gz) gzip -dc "$src" >"$root/lib/modules/$dst" ;;
	*) cp "$src" "$root/lib/modules/$dst" ;;
	esac
	echo "${e%%[!?]*}$dst" >>"$root/lib/modules/load.list"
done
# /dev/console for the kernel to open before /init runs (the kernel's built-in initramfs
# has one too; mknod may be refused in a container, which is then harmless).
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true

# Deterministic archive: fixed mtimes, sorted names, newc format, gzip without name/time.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
	cpio --quiet -o -0 -H newc -R 0:0 --reproducible) | gzip -9 -n >"$tmp/initramfs.cpio.gz"
mv "$tmp/initramfs.cpio.gz" "$out/initramfs.cpio.gz"

write_env
echo "$stamp" >"$out/.stamp"
log "kernel $KVER ($kind), initramfs $(stat -c %s "$out/initramfs.cpio.gz") bytes, modules:" \
	"$(sed 's|.*/||; s|\.ko$||' "$root/lib/modules/load.list" | tr '\n' ' ')"
