#!/bin/bash
# scenarios.sh [SCENARIO...] — real VMs boot streamed images through `streamboot serve`.
#
# Each scenario starts from a copy of v1.img, with v2 (or v2-bad) served over HTTP by a
# private nginx, and drives the streamboot CLI as a user would:
#   migrate   prepare → serve → boot v2 via vhost-user (writes a file) → stop → confirm →
#             commit → the disk boots plain (no streamboot) as v2 with the file; the
#             disk is a plain disk of v2.img's size
#   rollback  prepare → serve → boot v2 → stop → rollback → disk == v1.img bit for bit →
#             boots plain as v1
#   fallback  target v2-bad, --max-trial-starts 2: two failed trial boots through one
#             serve, the third connection of that same serve boots v1; disk == v1.img
#   load      background hydration rate-limited (SB_LOAD_RATE, default 2M) so it runs
#             while the guest re-reads and verifies every file (sbtest.readall=1) →
#             stop → confirm → commit → disk == v2.img bit for bit
# Default: all four, in that order. Prints each step, PASS/FAIL per scenario, a wall time
# table and "N passed, M failed"; exits 1 if any failed (INT/TERM: the running scenario
# is stopped and cleaned up, exit 130). Work dirs and logs (console
# logs, serve logs, nginx access logs, streamboot outputs) stay in
# vm-tests/work/scenarios/<name>/ for inspection.
#
# Boots that must leave the disk byte-identical to an image (fallback's v1 boot, load's
# boot) mount the root read-only (`ro` on the kernel command line): a read-write ext4
# mount alone rewrites the superblock and journal (≈5 KB differ after a plain boot).
#
# Needs: vm-tests/setup.sh done, a built streamboot (cargo build --release; or set
# SB_STREAMBOOT), root. Env: lib.sh's SB_* settings (SB_TIMEOUT default 90 here),
# SB_LOAD_RATE, SB_STOP_WARN (seconds: a slower serve stop prints a WARN line, default 5).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${SB_TIMEOUT:=90}"
# shellcheck source=lib.sh
. "$here/lib.sh"
# shellcheck source=streamboot.sh
. "$here/streamboot.sh"

: "${SB_LOAD_RATE:=2M}"
: "${SB_STOP_WARN:=5}"
all_scenarios=(migrate rollback fallback load)

usage() {
	sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
	exit "${1:-0}"
}

# --- steps inside a scenario (each scenario runs in its own subshell) ---------------

dir='' # the running scenario's work dir

note() { echo "       $*"; }
ok() { echo "  ok   $*"; }
# bad MSG — the scenario fails here: later steps would only test a broken setup.
bad() {
	echo "  FAIL $*"
	exit 1
}

# sb NAME ARGS... — streamboot ARGS, output in $dir/NAME.out; fails the scenario on error.
sb() {
	local name=$1 rc=0
	shift
	"$SB" "$@" >"$dir/$name.out" 2>&1 || rc=$?
	((rc == 0)) || bad "streamboot $1 exited $rc: $(tail -n3 "$dir/$name.out" | tr '\n' ' ')($dir/$name.out)"
}

# boot STEP FUNC ARG [EXTRAS...] — a boot in the foreground (lib.sh FUNC: boot_vhost,
# boot_plain); its STREAMBOOT lines in $dir/STEP.verdicts. Fails on timeout or QEMU error.
boot() {
	local step=$1 fn=$2 arg=$3 rc=0
	shift 3
	sb_boot "$fn" "$arg" "$dir/$step.log" "$@" >"$dir/$step.verdicts" 2>>"$dir/vm.err" || rc=$?
	if ((rc != 0)); then
		bad "$step: QEMU exit $rc$( ((rc == 124)) && echo " (timed out after ${SB_TIMEOUT}s)") ($(tr '\n' '|' <"$dir/$step.verdicts") log $dir/$step.log)"
	fi
	times+=("$(printf '%-26s %6.2fs' "$(basename "$dir")/$step" "$SB_LAST_WALL")")
}

# expect STEP PATTERN... — each fixed string is in STEP's verdict lines.
expect() {
	local step=$1 p
	shift
	for p in "$@"; do
		grep -qF -- "$p" "$dir/$step.verdicts" ||
			bad "$step: no '$p' (got: $(tr '\n' '|' <"$dir/$step.verdicts") log $dir/$step.log)"
	done
}

# expect_line STEP LINE — LINE is one of STEP's verdict lines, exactly.
expect_line() {
	grep -qxF -- "$2" "$dir/$1.verdicts" ||
		bad "$1: no line '$2' (got: $(tr '\n' '|' <"$dir/$1.verdicts") log $dir/$1.log)"
}

# expect_none STEP PATTERN — the fixed string is not in STEP's verdict lines.
expect_none() {
	! grep -qF -- "$2" "$dir/$1.verdicts" ||
		bad "$1: unexpected '$2' (got: $(tr '\n' '|' <"$dir/$1.verdicts"))"
}

# verdict STEP — STEP's first VERDICT line, for the report.
verdict() { grep -m1 'VERDICT' "$dir/$1.verdicts" | cut -d' ' -f2-; }

# same_sha DISK IMAGE — DISK is IMAGE byte for byte.
same_sha() {
	local a b
	a=$(sb_sha256 "$1") b=$(sb_sha256 "$2")
	[[ $a == "$b" ]] ||
		bad "$(basename "$1") sha256 $a (size $(stat -c %s "$1")) != $(basename "$2") $b (size $(stat -c %s "$2"))"
	ok "sha256 of the disk == $(basename "$2") (${a:0:16}…)"
}

# is_plain DISK — streamboot status says DISK is not (any more) a prepared disk.
is_plain() {
	sb status-plain status --json "$1"
	grep -q '"prepared":false' "$dir/status-plain.out" ||
		bad "status: not a plain disk: $(cat "$dir/status-plain.out")"
	sb status-plain-text status "$1"
	ok "status: $(cat "$dir/status-plain-text.out")"
}

# state_is DISK STATE [TRIAL_STARTS] — offline status shows STATE (and the start counter).
state_is() {
	local name=status-$2
	sb "$name" status "$1"
	grep -qE "^state: +$2\$" "$dir/$name.out" || bad "status: expected state $2: $(tr '\n' '|' <"$dir/$name.out")"
	if [[ -n ${3:-} ]]; then
		grep -qE "^trial starts: +$3 of " "$dir/$name.out" ||
			bad "status: expected $3 trial starts: $(grep '^trial' "$dir/$name.out")"
	fi
	ok "status: state $2${3:+, trial starts $(sed -n 's/^trial starts: *//p' "$dir/$name.out")}"
}

# setup NAME TARGET_IMAGE — scenario dir, disk = copy of v1, nginx serving the images.
setup() {
	dir=$run/$1
	rm -rf "$dir"
	mkdir -p "$dir"
	cp --sparse=always "$img/v1.img" "$dir/disk.img" || bad "copying v1.img"
	start_nginx "$img" "$dir/nginx" 2>>"$dir/vm.err" || bad "nginx did not start ($dir/vm.err)"
	target_url=$SB_NGINX_URL/$2
	note "disk $dir/disk.img (copy of v1.img), target $target_url"
}

# serve_up [ARGS] / serve_down — streamboot serve on $dir/vu.sock; serve_down checks that
# it stopped cleanly (exit 0) on SIGTERM.
serve_up() {
	start_serve "$dir/disk.img" "$dir/vu.sock" "$@" 2>>"$dir/vm.err" ||
		bad "serve did not start: $(tail -n3 "$dir/vu.sock.log" | tr '\n' ' ')"
	ok "serve started (pid $SB_SERVE_PID${*:+, $*})"
}
serve_down() {
	local t0=$EPOCHREALTIME
	stop_serve 2>>"$dir/vm.err" || bad "serve did not exit 0 on SIGTERM: $(tail -n3 "$dir/vm.err" | tr '\n' ' ')"
	local took
	took=$(sb_since "$t0")
	ok "serve stopped on SIGTERM, exit 0 (${took}s)"
	# Not a failure (the scenarios test boots), but worth seeing: with no VM connected a
	# stop has nothing to drain. Known: a rate-limited hydrator is slow to stop (each
	# worker first waits out the rate limit for its next 8 MiB request).
	if awk -v t="$took" -v w="$SB_STOP_WARN" 'BEGIN { exit !(t > w) }'; then
		echo "  WARN serve took ${took}s to exit after SIGTERM (over ${SB_STOP_WARN}s; $(grep -o 'hydration finished.*' "$dir/vu.sock.log"))"
	fi
}

# --- scenarios ------------------------------------------------------------------------

scenario_migrate() {
	setup migrate v2.img
	sb prepare prepare "$dir/disk.img" --target "$target_url"
	ok "prepare: $(cat "$dir/prepare.out")"
	state_is "$dir/disk.img" prepared 0

	serve_up
	boot 1-v2-vhost boot_vhost "$dir/vu.sock" sbtest.write=migrated
	expect 1-v2-vhost "STREAMBOOT-VERDICT v2 files-ok" "STREAMBOOT-INFO version=2" \
		"STREAMBOOT-WROTE migrated sha256="
	ok "v2 booted through streamboot serve in ${SB_LAST_WALL}s: $(verdict 1-v2-vhost), wrote /migrated; $(sb_mib "$(nginx_bytes)") fetched"
	serve_down
	grep -q 'trial start 1 of' "$dir/vu.sock.log" || bad "serve log: no 'trial start 1 of'"
	state_is "$dir/disk.img" trial 1

	sb confirm confirm "$dir/disk.img"
	state_is "$dir/disk.img" confirmed
	sb commit commit "$dir/disk.img"
	ok "commit: $(cat "$dir/commit.out")"
	is_plain "$dir/disk.img"
	local size want
	size=$(stat -c %s "$dir/disk.img") want=$(stat -c %s "$img/v2.img")
	((size == want)) || bad "disk size $size after commit, v2.img is $want"
	ok "disk size $size == v2.img's"

	boot 2-plain boot_plain "$dir/disk.img"
	expect 2-plain "STREAMBOOT-VERDICT v2 files-ok written=migrated:ok" "STREAMBOOT-INFO version=2"
	ok "committed disk booted plain (virtio-blk, no streamboot) in ${SB_LAST_WALL}s: $(verdict 2-plain)"
}

scenario_rollback() {
	setup rollback v2.img
	sb prepare prepare "$dir/disk.img" --target "$target_url"
	ok "prepare: $(cat "$dir/prepare.out")"
	serve_up
	boot 1-v2-vhost boot_vhost "$dir/vu.sock" sbtest.write=discarded
	expect 1-v2-vhost "STREAMBOOT-VERDICT v2 files-ok" "STREAMBOOT-WROTE discarded sha256="
	ok "v2 booted through streamboot serve in ${SB_LAST_WALL}s: $(verdict 1-v2-vhost), wrote /discarded"
	serve_down

	sb rollback rollback "$dir/disk.img"
	ok "rollback: $(cat "$dir/rollback.out")"
	same_sha "$dir/disk.img" "$img/v1.img"
	is_plain "$dir/disk.img"

	boot 2-plain boot_plain "$dir/disk.img"
	expect_line 2-plain "STREAMBOOT-VERDICT v1 files-ok"
	expect 2-plain "STREAMBOOT-INFO version=1"
	ok "rolled-back disk booted plain in ${SB_LAST_WALL}s: $(verdict 2-plain) (no written file)"
}

scenario_fallback() {
	setup fallback v2-bad.img
	sb prepare prepare "$dir/disk.img" --target "$target_url" --max-trial-starts 2
	ok "prepare --max-trial-starts 2: $(cat "$dir/prepare.out")"
	serve_up
	local i
	for i in 1 2; do
		boot "$i-v2bad-vhost" boot_vhost "$dir/vu.sock"
		expect "$i-v2bad-vhost" "STREAMBOOT-VERDICT v2 init-FAILED"
		expect_none "$i-v2bad-vhost" "files-ok"
		ok "trial boot $i of v2-bad in ${SB_LAST_WALL}s: $(verdict "$i-v2bad-vhost"), powered off"
	done
	# The third VM connects to the same serve right away: the fallback happened when the
	# second trial boot disconnected. Read-only root: the disk must stay v1 bit for bit.
	boot 3-v1-vhost boot_vhost "$dir/vu.sock" ro
	expect 3-v1-vhost "STREAMBOOT-VERDICT v1 files-ok" "STREAMBOOT-INFO version=1"
	ok "third boot through the same serve in ${SB_LAST_WALL}s: $(verdict 3-v1-vhost)"
	grep -q 'trial start 2 of 2' "$dir/vu.sock.log" || bad "serve log: no 'trial start 2 of 2'"
	grep -q 'fell back' "$dir/vu.sock.log" || bad "serve log: no fallback message"
	ok "serve log: $(grep -o 'fell back:.*' "$dir/vu.sock.log" | sed 's/ event=.*//' | head -n1)"
	serve_down
	same_sha "$dir/disk.img" "$img/v1.img"
	is_plain "$dir/disk.img"
}

scenario_load() {
	setup load v2.img
	sb prepare prepare "$dir/disk.img" --target "$target_url"
	ok "prepare: $(cat "$dir/prepare.out")"
	local before
	before=$(nginx_bytes)
	serve_up --rate "$SB_LOAD_RATE"
	# Read-only root: no guest write at all, so after commit the disk must be v2.img.
	boot 1-v2-readall boot_vhost "$dir/vu.sock" sbtest.readall=1 ro
	local fetched total
	fetched=$(($(nginx_bytes) - before)) total=$(stat -c %s "$img/v2.img")
	expect 1-v2-readall "STREAMBOOT-VERDICT v2 files-ok" "STREAMBOOT-VERDICT v2 readall-ok"
	ok "v2 booted, every file re-read and verified in ${SB_LAST_WALL}s: $(grep readall "$dir/1-v2-readall.verdicts" | cut -d' ' -f2-)"
	# The point of the scenario: the guest's reads overlapped background hydration.
	if grep -q 'hydration finished' "$dir/vu.sock.log"; then
		bad "hydration finished before the VM powered off ($(sb_mib "$fetched") fetched): lower SB_LOAD_RATE"
	fi
	grep -q 'hydration stopped' "$dir/vu.sock.log" && bad "serve log: $(grep -m1 'hydration stopped' "$dir/vu.sock.log")"
	ok "hydration (--rate $SB_LOAD_RATE) still running when the VM powered off: $(sb_mib "$fetched") of $(sb_mib "$total") fetched by then"
	serve_down
	sb status-stopped status "$dir/disk.img"
	note "after serve: $(grep -E '^chunks:' "$dir/status-stopped.out")"
	sb confirm confirm "$dir/disk.img"
	sb commit commit "$dir/disk.img"
	ok "confirm, commit: $(cat "$dir/commit.out")"
	same_sha "$dir/disk.img" "$img/v2.img"
	is_plain "$dir/disk.img"
}

# --- runner ---------------------------------------------------------------------------

case ${1:-} in -h | --help) usage ;; esac
selected=("$@")
((${#selected[@]})) || selected=("${all_scenarios[@]}")
for s in "${selected[@]}"; do
	[[ " ${all_scenarios[*]} " == *" $s "* ]] || {
		echo "scenarios.sh: unknown scenario '$s' (${all_scenarios[*]})" >&2
		usage 2 >&2
	}
done

"$here/setup.sh" --check || exit 1
SB=$(sb_streamboot) || exit 1
"$here/build-guest.sh" "$SB_WORK/guest" || exit 1
"$here/build-images.sh" "$SB_WORK/images" || exit 1
img=$SB_WORK/images
run=$SB_WORK/scenarios
mkdir -p "$run"
accel=$(detect_accel) || exit 1
echo "scenarios: ${selected[*]} — $SB machine $SB_MACHINE/$accel, work $run"

# INT/TERM: the running scenario is told to stop (TERM: its EXIT trap ends its VM, serve
# and nginx), then the run ends with what it has.
scen_pid='' interrupted=0
on_signal() {
	interrupted=1
	echo "scenarios.sh: interrupted: stopping the running scenario" >&2
	[[ -z $scen_pid ]] || kill -TERM "$scen_pid" 2>/dev/null || true
}
trap on_signal INT TERM

passed=0 failed=0 summary=() t_all=$EPOCHREALTIME
for s in "${selected[@]}"; do
	echo "== $s"
	t0=$EPOCHREALTIME
	# A subshell per scenario: `bad` ends just that scenario, and its EXIT trap stops the
	# serve, nginx and any VM it started (by PID). In the background and waited for, so
	# that a signal reaches this shell's trap at once.
	(
		times=()
		dir=$run/$s
		trap 'exit 143' TERM
		trap 'sb_cleanup 2>>"$dir/vm.err"; printf "%s\n" "${times[@]}" >"$dir/boot-times"' EXIT
		"scenario_$s"
	) &
	scen_pid=$!
	rc=0
	wait "$scen_pid" || rc=$?
	# A signal ends the wait early: wait again, for the scenario's cleanup.
	while kill -0 "$scen_pid" 2>/dev/null; do
		rc=0
		wait "$scen_pid" || rc=$?
	done
	scen_pid=''
	wall=$(sb_since "$t0")
	if ((rc == 0)); then
		echo "PASS $s (${wall}s)"
		passed=$((passed + 1))
	else
		echo "FAIL $s (${wall}s; $( ((interrupted)) && echo "interrupted; ")logs in $run/$s)"
		failed=$((failed + 1))
	fi
	# Wall times include waits for VMs of other worktrees (the machine-wide VM lock).
	waits=$(grep -c 'waiting for the VM running elsewhere' "$run/$s/vm.err" 2>/dev/null)
	summary+=("$(printf '%-10s %-4s %7.2fs  boots:%s%s' "$s" "$( ((rc == 0)) && echo PASS || echo FAIL)" "$wall" \
		"$(awk '{ printf " %s", $2 }' "$run/$s/boot-times" 2>/dev/null)" \
		"$( ((${waits:-0} > 0)) && echo "  (waited for the VM lock ${waits}×)")")")
	((interrupted == 0)) || break
done
echo "wall times (total $(sb_since "$t_all")s):"
printf '  %s\n' "${summary[@]}"
echo "$passed passed, $failed failed$( ((interrupted)) && echo ", interrupted")"
((interrupted == 0)) || exit 130
((failed == 0))
