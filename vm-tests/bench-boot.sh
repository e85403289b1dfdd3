#!/bin/bash
# bench-boot.sh [N] — guest time to "ready" (root mounted, boot working set read: the
# guest's /etc/sb/bootset) and bytes fetched from nginx before it, for the v2 image of
# build-images.sh, one nginx, N interleaved rounds (default 3):
#   a  local      v2.img as a local raw disk (plain virtio-blk)
#   b  cold       v1 disk, `prepare` with the default boot set, `serve --no-hydrate`
#   bh cold+hyd   the same with background hydration running (the production default)
#   c  staged     `prepare --boot-profile` (recorded in a warm-up boot), `serve --no-hydrate`
#   d  qcow2 CoR  qcow2 overlay, backing file http://.../v2.img (QEMU's curl driver),
#                 -drive copy-on-read=on (QEMU's own lazy path)
# Every VM is q35 (SB_MACHINE overrides): QEMU 7.2's curl driver hung every microvm boot
# here (the guest never got past its first disk reads), while q35 boots fine with it.
# The guest runs with sbtest.ready sbtest.verify=0: it prints STREAMBOOT-READY <uptime>
# and powers off, so bytes logged by nginx up to the VM's exit are the bytes the boot
# needed (b, c, d; prepare's own fetches are reported apart). Prints a table; asserts nothing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
# shellcheck source=streamboot.sh
. "$here/streamboot.sh"
n=${1:-3}
SB_MACHINE=${SB_MACHINE_BENCH:-q35}
trap sb_cleanup EXIT

# QEMU's curl block driver (qemu-block-extra, the same version as qemu-system-x86).
if ! ls /usr/lib/x86_64-linux-gnu/qemu/block-curl.so >/dev/null 2>&1; then
	v=$(dpkg-query -W -f='${Version}' qemu-system-x86)
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "qemu-block-extra=$v" >/dev/null
fi

"$here/build-guest.sh" "$SB_GUEST"
"$here/build-images.sh" "$SB_WORK/images"
img=$SB_WORK/images
run=$SB_WORK/bench-boot
rm -rf "$run"
mkdir -p "$run"
SB_ACCEL=$(detect_accel)
export SB_ACCEL
sb=$(sb_streamboot)
start_nginx "$img" "$run/nginx"
url=$SB_NGINX_URL/v2.img
args=(sbtest.ready sbtest.verify=0)

# boot_qcow2_cor OVERLAY LOG [cmdline extras] — a qcow2 overlay with copy-on-read.
boot_qcow2_cor() {
	local ov=$1 log=$2
	shift 2
	sb_run_vm "$log" "$*" \
		-drive "if=none,id=d0,format=qcow2,file=$ov,copy-on-read=on" \
		-device "$(sb_virtio_dev blk),drive=d0,num-queues=$SB_QUEUES"
}

ready_of() { sb_verdicts "$1" | awk '$1 == "STREAMBOOT-READY" { print $2 }'; }

# prepared DISK [prepare args] — a fresh copy of v1 prepared for v2; prints prepare's bytes.
prepared() {
	local disk=$1
	shift
	cp --sparse=always "$img/v1.img" "$disk"
	: >"$SB_NGINX_DIR/access.log"
	"$sb" prepare "$disk" --target "$url" "$@" >/dev/null
	nginx_bytes
}

# A warm-up boot records the boot profile (saved when serve stops: no confirm came).
prepared "$run/rec.img" >/dev/null
start_serve "$run/rec.img" "$run/rec.sock" --no-hydrate --record-profile "$run/profile.json"
sb_boot boot_vhost "$run/rec.sock" "$run/rec.log" "${args[@]}" >/dev/null || true
stop_serve
prof_chunks=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["chunks"]))' "$run/profile.json")

configs=(a b bh c d)
declare -A ready=() bytes=() pbytes=()
for ((i = 1; i <= n; i++)); do
	for c in "${configs[@]}"; do
		log=$run/$c-$i.log
		pb=0
		case $c in
		a)
			cp --sparse=always "$img/v2.img" "$run/local.img"
			: >"$SB_NGINX_DIR/access.log"
			sb_boot boot_plain "$run/local.img" "$log" "${args[@]}" >/dev/null || true
			;;
		b | bh | c)
			extra=()
			[[ $c == c ]] && extra=(--boot-profile "$run/profile.json")
			pb=$(prepared "$run/$c.img" "${extra[@]}")
			serve=(--no-hydrate)
			[[ $c == bh ]] && serve=()
			: >"$SB_NGINX_DIR/access.log"
			start_serve "$run/$c.img" "$run/$c.sock" "${serve[@]}"
			sb_boot boot_vhost "$run/$c.sock" "$log" "${args[@]}" >/dev/null || true
			b_at_exit=$(nginx_bytes)
			stop_serve
			;;
		d)
			rm -f "$run/ov.qcow2"
			qemu-img create -q -f qcow2 -b "$url" -F raw "$run/ov.qcow2"
			: >"$SB_NGINX_DIR/access.log"
			sb_boot boot_qcow2_cor "$run/ov.qcow2" "$log" "${args[@]}" >/dev/null || true
			;;
		esac
		case $c in b | bh | c) b=$b_at_exit ;; *) b=$(nginx_bytes) ;; esac
		r=$(ready_of "$log")
		ready[$c]+="${r:-nan} "
		bytes[$c]+="$b "
		pbytes[$c]+="$pb "
	done
done

# med "v1 v2 ..." / min "..." — median and minimum of numbers.
med() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ a[NR] = $1 } END {
	printf "%.3f", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
min() { tr ' ' '\n' <<<"$1" | grep . | sort -g | head -n1; }
base=$(med "${ready[a]}")
declare -A label=([a]="a local disk" [b]="b streamboot cold" [bh]="b+hydration" [c]="c staged profile" [d]="d qcow2 copy-on-read")
echo "guest uptime at STREAMBOOT-READY, $n rounds ($SB_ACCEL, $SB_MACHINE, 1 vCPU, load $(cut -d' ' -f1-3 /proc/loadavg)); profile: $prof_chunks chunks"
printf '| %-22s | %-9s | %-9s | %-9s | %-22s | %-20s |\n' config "median s" "min s" "vs (a)" "bytes fetched by boot" "bytes fetched by prepare"
printf '|%s|%s|%s|%s|%s|%s|\n' ------------------------ ----------- ----------- ----------- ------------------------ ----------------------
for c in "${configs[@]}"; do
	m=$(med "${ready[$c]}")
	printf '| %-22s | %-9s | %-9s | %-9s | %-22s | %-20s |\n' "${label[$c]}" "$m" "$(min "${ready[$c]}")" \
		"$(awk -v m="$m" -v b="$base" 'BEGIN { printf "%.3fx", m / b }')" \
		"$(sb_mib "$(med "${bytes[$c]}")")" "$(sb_mib "$(med "${pbytes[$c]}")")"
done
