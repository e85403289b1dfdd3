#!/bin/bash
# smoke.sh — end-to-end check of the VM test harness, with boot times.
#
# Builds the guest and the images into vm-tests/work/ (cached), then, one VM at a time:
#   1. v1 booted plain (virtio-blk)                    → v1 files-ok (+ READY time)
#   2. v2 through qemu-storage-daemon vhost-user-blk,
#      sbtest.write=smoke-vhost                        → v2 files-ok, file written
#   3. the same v2 disk booted plain, sbtest.readall=1 → written=smoke-vhost:ok, readall-ok
#   4. v2-bad booted plain                             → v2 init-FAILED
#   5. v1 through qemu-nbd (boot_nbd)                  → v1 files-ok
#   6. v1 with one byte of a library flipped            → v1 files-BAD <that file>
# plus: the image build is reproducible (a second build gives the same sha256s).
# Boots work on copies in work/smoke/, never on the built images.
# Prints PASS/FAIL lines, a timing table and "N passed, M failed"; exit 1 on any failure.
# Env: SB_MACHINE, SB_ACCEL, SB_TIMEOUT... (see lib.sh); SB_SMOKE_SKIP_SETUP=1 skips setup.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

[[ ${SB_SMOKE_SKIP_SETUP:-0} == 1 ]] || "$here/setup.sh"
"$here/build-guest.sh" "$SB_WORK/guest"
"$here/build-images.sh" "$SB_WORK/images"

run=$SB_WORK/smoke
rm -rf "$run"
mkdir -p "$run"
img=$SB_WORK/images
part_offset=$(sed -n 's/^PART_OFFSET=//p' "$img/images.env")
for i in v1 v2 v2-bad; do cp --sparse=always "$img/$i.img" "$run/$i.img"; done

cleanup() {
	stop_qsd "$run/qsd.sock"
	stop_nbd "$run/nbd.sock"
}
trap cleanup EXIT

passed=0 failed=0
times=()
pass() {
	echo "PASS $*"
	passed=$((passed + 1))
}
fail() {
	echo "FAIL $*"
	failed=$((failed + 1))
}

# expect NAME VERDICTS_FILE PATTERN... — every fixed-string PATTERN is in the verdicts.
expect() {
	local name=$1 file=$2 p
	shift 2
	for p in "$@"; do
		if ! grep -qF -- "$p" "$file"; then
			fail "$name: missing '$p' (got: $(tr '\n' '|' <"$file"); log ${file%.verdicts})"
			return 0
		fi
	done
	pass "$name"
}

# record NAME LOG — boot time table row: wall time and the guest's own uptime figures.
record() {
	local name=$1 log=$2 ready up
	ready=$(sb_verdicts "$log" | awk '$1 == "STREAMBOOT-READY" { print $2 }' | head -n1)
	up=$(sb_verdicts "$log" | sed -n 's/^STREAMBOOT-INFO .*uptime=\([0-9.]*\).*/\1/p' | head -n1)
	times+=("$(printf '%-22s wall %6ss  guest: ready %5ss  verdict %5ss  exit %s' \
		"$name" "$SB_LAST_WALL" "${ready:--}" "${up:--}" "$SB_LAST_RC")")
}

# boot STEP FUNC ARG — run a boot function, keeping its verdicts in STEP's .verdicts.
boot() {
	local step=$1 fn=$2 arg=$3
	shift 3
	"$fn" "$arg" "$run/$step.log" "$@" >"$run/$step.verdicts" || true
	record "$step" "$run/$step.log"
}

accel=$(detect_accel)
echo "smoke: machine $SB_MACHINE, accel $accel, work $run"

# 1. v1, plain virtio-blk.
boot 1-v1-plain boot_plain "$run/v1.img" sbtest.ready
expect "v1 plain boot" "$run/1-v1-plain.verdicts" \
	"STREAMBOOT-READY" "STREAMBOOT-VERDICT v1 files-ok" "STREAMBOOT-INFO version=1"

# 2. v2 through the reference vhost-user-blk backend, writing a file.
if start_qsd "$run/v2.img" "$run/qsd.sock"; then
	boot 2-v2-vhost boot_vhost "$run/qsd.sock" sbtest.ready sbtest.write=smoke-vhost
	stop_qsd "$run/qsd.sock"
	expect "v2 vhost-user-blk boot + write" "$run/2-v2-vhost.verdicts" \
		"STREAMBOOT-VERDICT v2 files-ok" "STREAMBOOT-WROTE smoke-vhost sha256="
else
	fail "v2 vhost-user-blk boot: qemu-storage-daemon did not start"
fi

# 3. The file written through vhost-user-blk is on the disk: plain boot, re-read all.
boot 3-v2-plain-verify boot_plain "$run/v2.img" sbtest.readall=1
expect "v2 plain boot sees the written file" "$run/3-v2-plain-verify.verdicts" \
	"STREAMBOOT-VERDICT v2 files-ok written=smoke-vhost:ok" "STREAMBOOT-VERDICT v2 readall-ok"

# 4. The broken target says so.
boot 4-v2-bad boot_plain "$run/v2-bad.img"
expect "v2-bad reports init-FAILED" "$run/4-v2-bad.verdicts" "STREAMBOOT-VERDICT v2 init-FAILED"
if grep -q files-ok "$run/4-v2-bad.verdicts"; then fail "v2-bad must not report files-ok"; fi

# 5. v1 over NBD (qemu-nbd on a unix socket).
if url=$(start_nbd "$run/v1.img" "$run/nbd.sock"); then
	boot 5-v1-nbd boot_nbd "$url" sbtest.ready
	stop_nbd "$run/nbd.sock"
	expect "v1 NBD boot" "$run/5-v1-nbd.verdicts" "STREAMBOOT-VERDICT v1 files-ok"
else
	fail "v1 NBD boot: qemu-nbd did not start"
fi

# 6. Corruption is detected: one byte of a shared library flipped on a copy of v1.
# The byte's disk address comes from the file's block map (debugfs on the partition).
cp --sparse=always "$img/v1.img" "$run/v1-corrupt.img"
blk=$(debugfs -R "bmap /usr/lib/sb/lib03.so 1" "$run/v1-corrupt.img?offset=$part_offset" 2>/dev/null)
if [[ $blk =~ ^[0-9]+$ ]]; then
	off=$((part_offset + blk * 4096 + 123))
	old=$(od -An -tu1 -j "$off" -N1 "$run/v1-corrupt.img" | tr -d ' ')
	printf '%b' "\\0$(printf %03o $(((old + 1) % 256)))" |
		dd of="$run/v1-corrupt.img" bs=1 seek="$off" conv=notrunc status=none
	boot 6-v1-corrupt boot_plain "$run/v1-corrupt.img"
	expect "corrupted v1 is detected" "$run/6-v1-corrupt.verdicts" \
		"STREAMBOOT-VERDICT v1 files-BAD usr/lib/sb/lib03.so"
else
	fail "corruption test: no block map for lib03.so ($blk)"
fi

# Reproducible images: a fresh build in another directory gives the same bytes.
"$here/build-images.sh" "$run/rebuild" 2>/dev/null
if cmp -s "$img/images.sha256" "$run/rebuild/images.sha256"; then
	pass "images are reproducible ($(cut -c1-12 "$img/images.sha256" | tr '\n' ' '))"
else
	fail "images differ between two builds: $(diff "$img/images.sha256" "$run/rebuild/images.sha256" | tr '\n' ' ')"
fi
rm -rf "$run/rebuild"

echo "boot times ($SB_MACHINE/$accel, 1 vCPU, ${SB_MEM_MB} MiB; wall = QEMU start to exit):"
printf '  %s\n' "${times[@]}"
echo "$passed passed, $failed failed"
((failed == 0))
