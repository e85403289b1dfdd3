# shellcheck shell=bash
# lib.sh — helpers for VM tests; source it: `. vm-tests/lib.sh`.
#
# Every VM boots the guest from build-guest.sh by direct kernel boot (-kernel/-initrd,
# root=/dev/vda1), prints its console to a log file, powers itself off (-no-reboot turns a
# reboot or panic into a QEMU exit too, unless SB_REBOOT=1) and is killed after SB_TIMEOUT
# seconds at most.
# Guest RAM is always a shared memfd: vhost-user-blk needs it (without it the guest hangs
# silently), and plain boots then run the very same VM shape.
#
# Settings (environment, all optional):
#   SB_WORK      scratch dir (default vm-tests/work)     SB_GUEST  build-guest.sh output
#   SB_MACHINE   microvm | q35 (default microvm)          SB_MEM_MB guest RAM (default 256)
#   SB_TIMEOUT   hard limit per boot, s (default 120)     SB_QUEUES virtqueues (default 1)
#   SB_ACCEL     kvm | tcg: skip detection                SB_QEMU   qemu-system binary
#   SB_VERBOSE=1 full kernel log on the console (default: quiet)
#   SB_PANIC     the guest kernel's panic= (default -1: reboot at once, which -no-reboot
#                turns into a QEMU exit; 1: reboot after 1 s)
#   SB_REBOOT=1  no -no-reboot: a guest reboot or panic resets the VM inside the same
#                QEMU process (direct kernel boot runs the kernel again), only a poweroff
#                (or SB_TIMEOUT) ends QEMU
#   SB_CONSOLE_IN  a FIFO: the console's input (each line written to it reaches the
#                guest's console; the console output still goes to the log)
#   SB_VU_RECONNECT  seconds: boot_vhost's chardev reconnects to the backend's socket
#                (reconnect=N), so the VM survives a backend restart
#   SB_VM_LOCK   lock file that serialises VMs machine-wide, so that tests of several
#                worktrees sharing the 2 cores never run two VMs at once
#                (default /tmp/streamboot-vm.lock; empty: no lock, e.g. for a test that
#                needs two VMs at the same time)
# After each boot: SB_LAST_RC (QEMU/timeout exit code, 124 = timed out), SB_LAST_WALL
# (seconds from QEMU start to exit) when the boot function ran in the current shell.

SB_VMT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${SB_WORK:=$SB_VMT/work}"
: "${SB_GUEST:=$SB_WORK/guest}"
: "${SB_MACHINE:=microvm}"
: "${SB_MEM_MB:=256}"
: "${SB_TIMEOUT:=120}"
: "${SB_QUEUES:=1}"
: "${SB_QEMU:=qemu-system-x86_64}"
: "${SB_VM_LOCK=/tmp/streamboot-vm.lock}"
SB_LAST_RC=0
SB_LAST_WALL=0

sb_log() { echo "[vm] $*" >&2; }

# Loads KERNEL/INITRD/KVER from build-guest.sh's guest.env.
sb_guest_env() {
	if [[ ! -r $SB_GUEST/guest.env ]]; then
		sb_log "no guest in $SB_GUEST: run vm-tests/build-guest.sh $SB_GUEST"
		return 1
	fi
	# shellcheck source=/dev/null
	. "$SB_GUEST/guest.env"
}

# Host TSC rate in kHz. Under TCG the guest TSC ticks at the host rate; microvm guests
# need it on the command line (tsc_early_khz) or ~1 boot in 3 hangs calibrating.
sb_tsc_khz() {
	awk -F: '/^cpu MHz/ { printf "%d\n", $2 * 1000; exit }' /proc/cpuinfo
}

# Kernel command line shared by all boots; extra words are appended.
sb_cmdline() {
	local c="console=ttyS0 root=/dev/vda1 rw rootfstype=ext4 panic=${SB_PANIC:--1}"
	[[ ${SB_VERBOSE:-0} == 1 ]] || c+=" quiet"
	if [[ $SB_MACHINE == microvm ]]; then
		local khz
		khz=$(sb_tsc_khz)
		[[ -z $khz ]] || c+=" tsc_early_khz=$khz"
	fi
	echo "$c${*:+ $*}"
}

# Machine-specific QEMU arguments (into the array named by $1).
sb_machine_args() {
	local -n _a=$1
	_a+=(-object "memory-backend-memfd,id=mem,size=${SB_MEM_MB}M,share=on")
	case $SB_MACHINE in
	microvm)
		# virtio-mmio must be modern (v2) for vhost-user-blk and for the 6.1 driver's MQ.
		_a+=(-M "microvm,memory-backend=mem,acpi=on" -global "virtio-mmio.force-legacy=false") ;;
	q35)
		_a+=(-M "q35,memory-backend=mem,smbus=off,sata=off") ;;
	*)
		sb_log "unknown SB_MACHINE=$SB_MACHINE (microvm or q35)"
		return 1 ;;
	esac
}

# virtio device type for the block disk on this machine type: pci or mmio flavour.
sb_virtio_dev() { # sb_virtio_dev blk|vhost
	case $SB_MACHINE/$1 in
	microvm/blk) echo virtio-blk-device ;;
	microvm/vhost) echo vhost-user-blk ;;
	*/blk) echo virtio-blk-pci ;;
	*/vhost) echo vhost-user-blk-pci ;;
	esac
}

# detect_accel: prints kvm or tcg. KVM is used only if a tiny boot of the real guest
# kernel with -accel kvm reaches the initramfs (a paravirtual /dev/kvm can open fine and
# still fail to run the kernel). The answer is cached in $SB_WORK/accel per kernel.
detect_accel() {
	if [[ -n ${SB_ACCEL:-} ]]; then
		echo "$SB_ACCEL"
		return 0
	fi
	sb_guest_env || return 1
	local cache=$SB_WORK/accel key="$KVER $SB_MACHINE" accel=tcg
	if [[ -r $cache ]] && [[ $(sed -n 2p "$cache") == "$key" ]]; then
		sed -n 1p "$cache"
		return 0
	fi
	if [[ -r /dev/kvm && -w /dev/kvm ]]; then
		local log=$SB_WORK/accel-probe.log args=()
		sb_machine_args args || return 1
		rm -f "$log"
		# In a subshell: a QEMU abort (seen with a paravirtual KVM) is reported quietly.
		(timeout -k 2 10 "$SB_QEMU" -accel kvm -cpu host -smp 1 -m "${SB_MEM_MB}M" \
			-nodefaults -no-user-config -display none -no-reboot "${args[@]}" \
			-kernel "$KERNEL" -initrd "$INITRD" -append "$(sb_cmdline sbinit.probe=1)" \
			-chardev "file,id=ser0,path=$log" -serial chardev:ser0 \
			</dev/null >"$log.qemu" 2>&1 || true) 2>/dev/null
		if grep -aq STREAMBOOT-PROBE-OK "$log" 2>/dev/null; then accel=kvm; fi
	fi
	mkdir -p "$SB_WORK"
	printf '%s\n%s\n' "$accel" "$key" >"$cache"
	sb_log "accelerator: $accel (cached in $cache)"
	echo "$accel"
}

# The STREAMBOOT-* lines of a console log (kernel output may share a line: cut at CR).
sb_verdicts() {
	grep -aoE 'STREAMBOOT-[A-Z0-9-]+[^'$'\r'']*' "$1" 2>/dev/null || true
}

# sb_run_vm LOG CMDLINE_EXTRAS DISK_ARGS... — one VM from start to exit, in the
# foreground. Prints the verdict lines; returns QEMU's exit code (124: timed out).
sb_run_vm() {
	local log=$1 extras=$2
	shift 2
	local accel args=() t0 rc=0
	sb_guest_env || return 1
	accel=$(detect_accel) || return 1
	args=(-accel "$accel" -smp 1 -m "${SB_MEM_MB}M" -nodefaults -no-user-config
		-display none)
	[[ ${SB_REBOOT:-0} == 1 ]] || args+=(-no-reboot)
	[[ $accel == kvm ]] && args+=(-cpu host)
	sb_machine_args args || return 1
	local con="file,id=ser0,path=$log"
	if [[ -n ${SB_CONSOLE_IN:-} ]]; then
		# QEMU 7.2's file chardev has no input-path: a pipe chardev reads PATH.in (the
		# FIFO), writes PATH.out (/dev/null) and logs everything it writes to LOG.
		ln -sfn "$SB_CONSOLE_IN" "$log.con.in"
		ln -sfn /dev/null "$log.con.out"
		con="pipe,id=ser0,path=$log.con,logfile=$log"
	fi
	args+=(-kernel "$KERNEL" -initrd "$INITRD" -append "$(sb_cmdline "$extras")"
		-chardev "$con" -serial chardev:ser0 "$@")
	mkdir -p "$(dirname "$log")"
	printf '%q ' "$SB_QEMU" "${args[@]}" >"$log.cmd"
	echo >>"$log.cmd"
	local lockfd=''
	if [[ -n $SB_VM_LOCK ]]; then
		exec {lockfd}>>"$SB_VM_LOCK"
		if ! flock -n "$lockfd"; then
			sb_log "$(basename "$log"): waiting for the VM running elsewhere ($SB_VM_LOCK)"
			flock -w 900 "$lockfd" || {
				exec {lockfd}>&-
				sb_log "gave up waiting for $SB_VM_LOCK"
				return 1
			}
		fi
	fi
	t0=$EPOCHREALTIME
	timeout -k 5 "$SB_TIMEOUT" "$SB_QEMU" "${args[@]}" </dev/null >"$log.qemu" 2>&1 || rc=$?
	[[ -z $lockfd ]] || exec {lockfd}>&-
	SB_LAST_WALL=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
	# shellcheck disable=SC2034 # read by callers
	SB_LAST_RC=$rc
	sb_log "$(basename "$log"): $SB_MACHINE/$accel, ${SB_LAST_WALL}s, exit $rc$( ((rc == 124)) && echo ' (TIMEOUT)')"
	sb_verdicts "$log"
	return "$rc"
}

# boot_plain DISK LOG [cmdline extras] — the disk as a QEMU virtio-blk device.
boot_plain() {
	local disk=$1 log=$2
	shift 2
	sb_run_vm "$log" "$*" \
		-drive "if=none,id=d0,format=raw,file=$disk,aio=threads" \
		-device "$(sb_virtio_dev blk),drive=d0,num-queues=$SB_QUEUES"
}

# boot_vhost SOCKET LOG [cmdline extras] — the disk served by a vhost-user-blk backend
# (SB_VU_RECONNECT=N: QEMU reconnects to SOCKET N seconds after the backend went away).
boot_vhost() {
	local sock=$1 log=$2
	shift 2
	sb_run_vm "$log" "$*" \
		-chardev "socket,id=vu0,path=$sock${SB_VU_RECONNECT:+,reconnect=$SB_VU_RECONNECT}" \
		-device "$(sb_virtio_dev vhost),chardev=vu0,num-queues=$SB_QUEUES"
}

# boot_nbd URL LOG [cmdline extras] — the disk read from an NBD server
# (nbd://host:port/export or nbd+unix:///export?socket=PATH).
boot_nbd() {
	local url=$1 log=$2
	shift 2
	sb_run_vm "$log" "$*" \
		-drive "if=none,id=d0,format=raw,file=$url" \
		-device "$(sb_virtio_dev blk),drive=d0,num-queues=$SB_QUEUES"
}

# wait_for_line LOG PATTERN TIMEOUT — wait until LOG has a line matching the extended
# regex PATTERN; 0 if seen, 1 after TIMEOUT seconds. For VMs started in the background.
wait_for_line() {
	local log=$1 pat=$2 n
	n=$(awk -v t="$3" 'BEGIN { printf "%d", t * 10 }')
	while ! grep -aqE -- "$pat" "$log" 2>/dev/null; do
		((n-- > 0)) || return 1
		sleep 0.1
	done
}

# start_qsd DISK SOCKET [NUM_QUEUES] — qemu-storage-daemon exporting DISK over
# vhost-user-blk (the reference backend). Returns once the socket listens; the pid is in
# SOCKET.pid and SB_QSD_PID, the daemon's messages in SOCKET.log. Stop with stop_qsd.
start_qsd() {
	local disk=$1 sock=$2 nq=${3:-$SB_QUEUES}
	rm -f "$sock" "$sock.pid"
	qemu-storage-daemon \
		--blockdev "driver=file,node-name=f,filename=$disk,aio=threads" \
		--blockdev driver=raw,node-name=d,file=f \
		--export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=$nq" \
		--daemonize --pidfile "$sock.pid" </dev/null >"$sock.log" 2>&1 || {
		sb_log "qemu-storage-daemon failed: $(cat "$sock.log")"
		return 1
	}
	# shellcheck disable=SC2034 # read by callers
	SB_QSD_PID=$(cat "$sock.pid")
}

# stop_qsd SOCKET — stop the daemon started by start_qsd for SOCKET.
stop_qsd() { sb_stop_daemon "$1"; }

# sb_stop_daemon SOCKET — end the daemon whose pid is in SOCKET.pid (that pid only:
# TERM, then KILL after 5 s) and remove its socket.
sb_stop_daemon() {
	local sock=$1 pid n=50
	[[ -r $sock.pid ]] || return 0
	pid=$(cat "$sock.pid")
	kill "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null && ((n-- > 0)); do sleep 0.1; done
	kill -9 "$pid" 2>/dev/null || true
	rm -f "$sock" "$sock.pid"
}

# start_nbd DISK SOCKET — qemu-nbd exporting DISK (writable, raw) on a unix socket; prints
# the URL for boot_nbd. qemu-nbd serves one connection, then exits (or use stop_nbd).
start_nbd() {
	local disk=$1 sock=$2
	rm -f "$sock" "$sock.pid"
	qemu-nbd --fork --pid-file="$sock.pid" --format=raw --cache=writeback --aio=threads \
		--socket="$sock" "$disk" </dev/null >"$sock.log" 2>&1 || {
		sb_log "qemu-nbd failed: $(cat "$sock.log")"
		return 1
	}
	echo "nbd+unix:///?socket=$sock"
}

# stop_nbd SOCKET — stop the qemu-nbd started by start_nbd for SOCKET, if still running.
stop_nbd() { sb_stop_daemon "$1"; }
