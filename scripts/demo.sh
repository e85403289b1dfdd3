#!/bin/bash
# demo.sh — the one-command streamboot demo, on a fresh Debian (bookworm) machine, as root:
#
#   bash scripts/demo.sh
#
# Installs what the VM tests need (vm-tests/setup.sh), builds streamboot (cargo build
# --release), the guest kernel + initramfs and the test images, then shows a VM booting
# v2 while it streams from an HTTP server onto a disk that holds v1:
#   nginx serves v2.img → streamboot prepare → streamboot serve --control → QEMU boots v2
#   through vhost-user-blk (time to the guest's verdict, bytes fetched by then) → confirm
#   through serve's control socket while the VM still runs (it re-reads every file) →
#   stop serve → commit on the disk (the disk now is v2.img, byte for byte) → QEMU boots
#   the disk plain, without streamboot.
# Background hydration is off during the boot, so every byte fetched before the verdict is
# one the VM asked for; commit fetches the rest. The streamed boot mounts its root
# read-only: a read-write mount rewrites the ext4 superblock, and the final disk could not
# be compared with v2.img. About 20 s once installed and built (TCG, 1 vCPU).
# Work dir and logs: vm-tests/work/demo/. Env: vm-tests/lib.sh's SB_* settings.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
t_start=$EPOCHREALTIME

say() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
	echo "demo: error: $*" >&2
	exit 1
}

say "1. packages (vm-tests/setup.sh)"
bash vm-tests/setup.sh

say "2. build streamboot (cargo build --release)"
export PATH="$PATH:$HOME/.cargo/bin"
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs), then run this again"
cargo build --release
export SB_STREAMBOOT=${CARGO_TARGET_DIR:-$repo/target}/release/streamboot
[[ -x $SB_STREAMBOOT ]] || die "no $SB_STREAMBOOT after the build"
SB=$SB_STREAMBOOT

: "${SB_TIMEOUT:=90}"
# shellcheck source=../vm-tests/lib.sh
. vm-tests/lib.sh
# shellcheck source=../vm-tests/streamboot.sh
. vm-tests/streamboot.sh

say "3. guest kernel + initramfs, test images v1/v2 (cached in vm-tests/work)"
vm-tests/build-guest.sh "$SB_WORK/guest"
vm-tests/build-images.sh "$SB_WORK/images"
img=$SB_WORK/images
demo=$SB_WORK/demo
rm -rf "$demo"
mkdir -p "$demo"
trap sb_cleanup EXIT
trap 'echo "demo: interrupted" >&2; exit 130' INT TERM
accel=$(detect_accel)
info "VM: QEMU $SB_MACHINE, $accel, 1 vCPU, ${SB_MEM_MB} MiB"

# json_status DISK — `streamboot status --json DISK`, pretty-printed when python3 is here.
json_status() {
	info "streamboot status --json $(basename "$1"):"
	if command -v python3 >/dev/null; then
		"$SB" status --json "$1" | python3 -m json.tool | sed 's/^/      /'
	else
		"$SB" status --json "$1" | sed 's/^/      /'
	fi
}

say "4. nginx serves the target image v2.img over HTTP"
start_nginx "$img" "$demo/nginx"
url=$SB_NGINX_URL/v2.img
v1_sha=$(sb_sha256 "$img/v1.img") v2_sha=$(sb_sha256 "$img/v2.img")
v2_size=$(stat -c %s "$img/v2.img")
info "$url ($(sb_mib "$v2_size"), sha256 ${v2_sha:0:16}…)"
cp --sparse=always "$img/v1.img" "$demo/disk.img"
info "the VM's disk: $demo/disk.img, a copy of v1.img ($(sb_mib "$(stat -c %s "$img/v1.img")"), sha256 ${v1_sha:0:16}…)"

say "5. streamboot prepare: relocate v2's boot chunks onto the disk (reversible)"
t0=$EPOCHREALTIME
"$SB" prepare "$demo/disk.img" --target "$url" | sed 's/^/    /'
info "took $(sb_since "$t0")s, fetched $(sb_mib "$(nginx_bytes)") from nginx"
json_status "$demo/disk.img"

say "6. streamboot serve, and a VM boots v2 through vhost-user-blk while it streams"
ctl=$demo/ctl.sock
start_serve "$demo/disk.img" "$demo/vu.sock" --no-hydrate --control "$ctl"
info "serve pid $SB_SERVE_PID on $demo/vu.sock (background hydration off), control socket $ctl"
before=$(nginx_bytes)
log=$demo/boot-v2.log
rm -f "$log" "$log.qemu"
# After its verdict the guest re-reads every file (sbtest.readall=1): the VM keeps
# running while step 7 confirms.
sb_bg_boot boot_vhost "$demo/vu.sock" "$log" sbtest.readall=1 ro
# QEMU starts when lib.sh creates LOG.qemu (after waiting for any VM running elsewhere).
while [[ ! -e $log.qemu ]] && sb_bg_running; do sleep 0.05; done
t_vm=$EPOCHREALTIME
wait_for_line "$log" 'STREAMBOOT-VERDICT' "$SB_TIMEOUT" || true
t_verdict=$(sb_since "$t_vm")
at_verdict=$(($(nginx_bytes) - before))
verdict=$(sb_verdicts "$log" | grep -m1 VERDICT || true)
[[ $verdict == "STREAMBOOT-VERDICT v2 files-ok" ]] || die "unexpected verdict '$verdict' (log $log)"
info "guest: $verdict (every file of v2 checked against its manifest)"
info "time to first verdict: ${t_verdict}s after QEMU started"
info "fetched from nginx before the verdict: $(sb_mib "$at_verdict") of $(sb_mib "$v2_size") ($(awk -v a="$at_verdict" -v b="$v2_size" 'BEGIN { printf "%.0f", 100 * a / b }')%), the rest not needed yet"

say "7. confirm the target through serve's control socket, while the VM still runs"
info "\$ streamboot confirm disk.img --control $(basename "$ctl")"
"$SB" confirm "$demo/disk.img" --control "$ctl" 2>&1 | sed 's/^/    /'
vm_running=no
sb_bg_running && vm_running=yes
st=$("$SB" status --json "$demo/disk.img" --control "$ctl")
info "status --control: state $(grep -o '"state":"[a-z]*"' <<<"$st" | cut -d'"' -f4), vm_connected $(grep -o '"vm_connected":[a-z]*' <<<"$st" | cut -d: -f2), VM running when confirm answered: $vm_running"
grep -q '"state":"confirmed"' <<<"$st" || die "not confirmed through $ctl: $st"
[[ $vm_running == yes ]] || info "(the VM had already powered off: nothing was confirmed mid-boot)"
rc=0
sb_bg_wait || rc=$?
((rc == 0)) || die "the VM failed (QEMU exit $rc): see $log"
sb_verdicts "$log" | grep -q 'VERDICT v2 readall-ok' || die "no readall-ok from the guest (log $log)"
uptime=$(sb_verdicts "$log" | sed -n 's/^STREAMBOOT-INFO .*uptime=\([0-9.]*\).*/\1/p')
info "guest: $(sb_verdicts "$log" | grep readall) (guest uptime at the first verdict ${uptime}s); VM powered off after ${SB_LAST_WALL}s"

say "8. stop serve (SIGTERM), commit on the disk"
stop_serve || die "serve did not stop cleanly (log $demo/vu.sock.log)"
info "serve stopped"
json_status "$demo/disk.img"
before=$(nginx_bytes)
t0=$EPOCHREALTIME
"$SB" commit "$demo/disk.img" | sed 's/^/    /'
info "commit took $(sb_since "$t0")s and fetched the remaining $(sb_mib "$(($(nginx_bytes) - before))")"
json_status "$demo/disk.img"
disk_sha=$(sb_sha256 "$demo/disk.img")
if [[ $disk_sha == "$v2_sha" ]]; then
	info "sha256 of the disk == sha256 of v2.img: MATCH (${disk_sha:0:16}…, $(sb_mib "$(stat -c %s "$demo/disk.img")"))"
else
	die "sha256 mismatch: disk $disk_sha, v2.img $v2_sha"
fi
stop_nginx

say "9. the committed disk boots plain (virtio-blk, no streamboot, no network)"
sb_boot boot_plain "$demo/disk.img" "$demo/boot-plain.log" sbtest.write=hello >/dev/null ||
	die "plain boot failed (log $demo/boot-plain.log)"
sb_verdicts "$demo/boot-plain.log" | grep -E 'VERDICT|WROTE' | sed 's/^/    guest: /'
sb_verdicts "$demo/boot-plain.log" | grep -q 'VERDICT v2 files-ok' || die "plain boot: no v2 files-ok"
info "booted in ${SB_LAST_WALL}s"

say "done in $(sb_since "$t_start")s: v1 → v2 streamed, booted, committed; the disk is plain v2 (logs in $demo)"
