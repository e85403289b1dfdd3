#!/bin/bash
# bench-machines.sh [N] — boot time of the test VM per machine type and kernel form.
# Boots v1 plain N times (default 3) for each of microvm/q35 × vmlinux (PVH)/bzImage,
# interleaved so that load from other processes spreads evenly, one VM at a time, with
# sbtest.ready sbtest.verify=0. Prints, per configuration, the median and min of the wall
# time (QEMU start to exit) and of the guest's uptime at STREAMBOOT-READY.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
n=${1:-3}

"$here/build-guest.sh" "$SB_WORK/guest"
SB_NO_VMLINUX=1 "$here/build-guest.sh" "$SB_WORK/guest-bzimage"
"$here/build-images.sh" "$SB_WORK/images"
run=$SB_WORK/bench
mkdir -p "$run"
SB_ACCEL=$(detect_accel)
export SB_ACCEL

configs=("microvm guest" "q35 guest" "microvm guest-bzimage" "q35 guest-bzimage")
declare -A wall=() ready=()
for ((i = 1; i <= n; i++)); do
	for c in "${configs[@]}"; do
		read -r m g <<<"$c"
		cp --sparse=always "$SB_WORK/images/v1.img" "$run/v1.img"
		SB_MACHINE=$m SB_GUEST=$SB_WORK/$g boot_plain "$run/v1.img" "$run/boot.log" \
			sbtest.ready sbtest.verify=0 >/dev/null 2>&1 || true
		r=$(sb_verdicts "$run/boot.log" | awk '$1 == "STREAMBOOT-READY" { print $2 }')
		wall[$c]+="$SB_LAST_WALL "
		ready[$c]+="${r:-nan} "
	done
done

# stats "v1 v2 ..." — median and min.
stats() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ a[NR] = $1 } END {
	m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
	printf "median %5.2fs min %5.2fs", m, a[1] }'; }
echo "boot to poweroff, $n runs each ($SB_ACCEL, 1 vCPU, load: $(cut -d' ' -f1-3 /proc/loadavg)):"
for c in "${configs[@]}"; do
	read -r m g <<<"$c"
	kind=vmlinux
	[[ $g == guest-bzimage ]] && kind=bzImage
	printf '  %-8s %-8s wall %s   READY uptime %s\n' "$m" "$kind" "$(stats "${wall[$c]}")" "$(stats "${ready[$c]}")"
done
