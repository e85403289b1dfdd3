# shellcheck shell=bash
# streamboot.sh — helpers for VM tests that run streamboot itself; source it after lib.sh:
#   . vm-tests/lib.sh; . vm-tests/streamboot.sh
#
#   sb_streamboot                  path of the streamboot binary (SB_STREAMBOOT, else
#                                  $CARGO_TARGET_DIR or target/, release before debug)
#   start_nginx DIR [LOGDIR]       nginx on a free 127.0.0.1 port serving DIR (own config,
#                                  pid, logs, temp dirs in LOGDIR); sets SB_NGINX_URL,
#                                  SB_NGINX_PID, SB_NGINX_DIR. stop_nginx stops it.
#   nginx_bytes                    body bytes nginx sent so far (sum over its access log)
#   nginx_requests                 requests logged so far
#   start_serve DISK SOCK [ARGS]   `streamboot serve DISK --socket SOCK ARGS` in the
#                                  background; returns when the socket listens. Log in
#                                  SOCK.log; sets SB_SERVE_PID.
#   stop_serve                     SIGTERM, wait; fails unless serve exited 0
#   sb_boot FUNC ARG LOG [EXTRAS]  a lib.sh boot function (boot_vhost, boot_plain...), but
#                                  interruptible: a trapped INT/TERM is handled at once
#   sb_bg_boot FUNC ARG LOG [EXTRAS]  a lib.sh boot function in the background (SB_BG_PID),
#                                  for acting mid-boot; sb_bg_wait waits for it,
#                                  sb_bg_running says whether it still runs
#   start_export STORE [ARGS]      `streamboot export --store STORE --listen 127.0.0.1:0
#                                  ARGS` in the background; returns when it listens. Log
#                                  in $SB_EXPORT_LOG; sets SB_EXPORT_PID, SB_EXPORT_ADDR
#                                  (host:port). stop_export: SIGTERM, wait, 0 if exit 0
#   boot_nbd_cow URL LOG [EXTRAS]  boot_nbd, with guest writes kept in a temporary local
#                                  overlay (snapshot=on): the export itself is read-only
#   sb_kill_tree PID               PID and its descendants (found by parent PID), KILL
#   sb_cleanup                     stop what the helpers above started (for EXIT traps)
#
# Every process is tracked and ended by its PID, never by name.

: "${SB_NGINX:=nginx}"
SB_NGINX_PID=''
SB_NGINX_URL=''
SB_NGINX_DIR=''
SB_SERVE_PID=''
SB_SERVE_LOG=''
SB_BG_PID=''
SB_BG_LOG=''
SB_EXPORT_PID=''
SB_EXPORT_LOG=''
SB_EXPORT_ADDR=''

# Prints the streamboot binary to use, or fails saying how to build it.
sb_streamboot() {
	if [[ -n ${SB_STREAMBOOT:-} ]]; then
		echo "$SB_STREAMBOOT"
		return 0
	fi
	local repo t p
	repo=$(cd "$SB_VMT/.." && pwd)
	t=${CARGO_TARGET_DIR:-$repo/target}
	for p in "$t/release/streamboot" "$t/debug/streamboot"; do
		if [[ -x $p ]]; then
			echo "$p"
			return 0
		fi
	done
	sb_log "no streamboot binary in $t/{release,debug}: run cargo build --release (or set SB_STREAMBOOT)"
	return 1
}

# sb_kill_tree PID — KILL PID's descendants (children first found via their parent PID)
# and PID itself. For a background boot: its subshell, timeout and QEMU.
sb_kill_tree() {
	local pid=$1 c
	[[ -n $pid ]] || return 0
	for c in $(pgrep -P "$pid" 2>/dev/null); do sb_kill_tree "$c"; done
	kill -9 "$pid" 2>/dev/null || true
}

# start_nginx DIR [LOGDIR] — serves DIR read-only on 127.0.0.1:<free port> with Range
# support (nginx's static module). LOGDIR (default: a new temp dir) holds nginx.conf,
# access.log (format: status bytes_sent body_bytes_sent "range" uri), error.log and the
# temp dirs. Tries a few random ports, so a port taken meanwhile does not matter.
start_nginx() {
	local root=$1 dir=${2:-} port tries=20 n
	root=$(cd "$root" && pwd) || return 1
	[[ -n $dir ]] || dir=$(mktemp -d /tmp/sb-nginx.XXXXXX) || return 1
	mkdir -p "$dir/tmp"
	dir=$(cd "$dir" && pwd)
	[[ -z $SB_NGINX_PID ]] || stop_nginx
	while ((tries-- > 0)); do
		port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
		if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then continue; fi
		{
			# As root, workers would switch to "nobody", which may not read DIR.
			[[ $EUID != 0 ]] || echo 'user root root;'
			cat <<-EOF
				worker_processes 1;
				daemon off;
				pid $dir/nginx.pid;
				error_log $dir/error.log warn;
				events { worker_connections 256; }
				http {
				    types { application/octet-stream img; }
				    default_type application/octet-stream;
				    log_format sb '\$status \$bytes_sent \$body_bytes_sent "\$http_range" \$request_method \$uri';
				    access_log $dir/access.log sb;
				    client_body_temp_path $dir/tmp/body;
				    proxy_temp_path $dir/tmp/proxy;
				    fastcgi_temp_path $dir/tmp/fastcgi;
				    uwsgi_temp_path $dir/tmp/uwsgi;
				    scgi_temp_path $dir/tmp/scgi;
				    sendfile on;
				    keepalive_requests 100000;
				    server {
				        listen 127.0.0.1:$port;
				        root $root;
				        location / { autoindex on; }
				    }
				}
			EOF
		} >"$dir/nginx.conf"
		: >"$dir/access.log"
		: >"$dir/error.log"
		"$SB_NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" </dev/null >>"$dir/nginx.out" 2>&1 &
		SB_NGINX_PID=$!
		n=50
		while ((n-- > 0)); do
			if ! kill -0 "$SB_NGINX_PID" 2>/dev/null; then break; fi
			if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/"; then
				SB_NGINX_URL=http://127.0.0.1:$port
				SB_NGINX_DIR=$dir
				: >"$dir/access.log" # the readiness probe is not a fetch
				sb_log "nginx pid $SB_NGINX_PID serving $root at $SB_NGINX_URL (logs in $dir)"
				return 0
			fi
			sleep 0.1
		done
		if kill -0 "$SB_NGINX_PID" 2>/dev/null; then
			sb_log "nginx pid $SB_NGINX_PID does not answer on port $port: $(tail -n3 "$dir/error.log")"
			sb_kill_tree "$SB_NGINX_PID"
			wait "$SB_NGINX_PID" 2>/dev/null
			SB_NGINX_PID=''
			return 1
		fi
		wait "$SB_NGINX_PID" 2>/dev/null
		SB_NGINX_PID=''
		# A port taken between the check and the bind: try another one.
		grep -q 'Address already in use' "$dir/error.log" "$dir/nginx.out" 2>/dev/null && continue
		sb_log "nginx failed: $(tail -n3 "$dir/error.log" "$dir/nginx.out")"
		return 1
	done
	sb_log "nginx: no free port found"
	return 1
}

# stop_nginx — graceful stop (QUIT), KILL after 5 s; only the pid start_nginx started.
stop_nginx() {
	local pid=$SB_NGINX_PID n=50
	[[ -n $pid ]] || return 0
	kill -QUIT "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null && ((n-- > 0)); do sleep 0.1; done
	if kill -0 "$pid" 2>/dev/null; then
		sb_log "nginx pid $pid did not stop: killing it and its workers"
		sb_kill_tree "$pid"
	fi
	wait "$pid" 2>/dev/null
	SB_NGINX_PID=''
}

# nginx_bytes — body bytes the running (or last) nginx sent so far, from its access log
# (a request still in flight is not logged yet).
nginx_bytes() {
	awk '{ s += $3 } END { printf "%d\n", s }' "$SB_NGINX_DIR/access.log"
}

# nginx_requests — requests logged so far.
nginx_requests() {
	awk 'END { print NR }' "$SB_NGINX_DIR/access.log"
}

# sb_mib BYTES — BYTES in MiB, one decimal.
sb_mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# start_serve DISK SOCK [ARGS...] — `streamboot serve` in the background, stdout and
# stderr in SOCK.log. Returns 0 once it printed its ready line and the socket exists; 1
# if it exited or did not get ready in 30 s (log tail printed). Sets SB_SERVE_PID (a
# child of this shell: stop_serve can read its exit status).
start_serve() {
	local disk=$1 sock=$2 sb n=300
	shift 2
	sb=$(sb_streamboot) || return 1
	[[ -z $SB_SERVE_PID ]] || {
		sb_log "start_serve: a serve (pid $SB_SERVE_PID) is running already"
		return 1
	}
	rm -f "$sock"
	SB_SERVE_LOG=$sock.log
	NO_COLOR=1 "$sb" serve "$disk" --socket "$sock" "$@" </dev/null >"$SB_SERVE_LOG" 2>&1 &
	SB_SERVE_PID=$!
	while ((n-- > 0)); do
		if ! kill -0 "$SB_SERVE_PID" 2>/dev/null; then
			local rc=0
			wait "$SB_SERVE_PID" || rc=$?
			sb_log "streamboot serve exited early (status $rc): $(tail -n5 "$SB_SERVE_LOG")"
			SB_SERVE_PID=''
			return 1
		fi
		if [[ -S $sock ]] && grep -aq '^serving ' "$SB_SERVE_LOG"; then
			sb_log "serve pid $SB_SERVE_PID: $(grep -a '^serving ' "$SB_SERVE_LOG" | head -n1)"
			return 0
		fi
		sleep 0.1
	done
	sb_log "streamboot serve not ready after 30 s: $(tail -n5 "$SB_SERVE_LOG")"
	sb_kill_tree "$SB_SERVE_PID"
	wait "$SB_SERVE_PID" 2>/dev/null
	SB_SERVE_PID=''
	return 1
}

# stop_serve [TIMEOUT] — SIGTERM to the serve start_serve started; waits for it to drain
# and flush (default 60 s, then KILL). 0 only if it exited with status 0.
stop_serve() {
	local pid=$SB_SERVE_PID t=${1:-60} n rc=0
	[[ -n $pid ]] || return 0
	n=$((t * 10))
	kill -TERM "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null && ((n-- > 0)); do sleep 0.1; done
	if kill -0 "$pid" 2>/dev/null; then
		sb_log "serve pid $pid still running ${t}s after SIGTERM: killing it"
		sb_kill_tree "$pid"
	fi
	wait "$pid" 2>/dev/null || rc=$?
	SB_SERVE_PID=''
	if ((rc != 0)); then
		sb_log "serve pid $pid exited with status $rc: $(tail -n5 "$SB_SERVE_LOG")"
		return 1
	fi
}

# sb_boot FUNC ARG LOG [EXTRAS...] — the same as `FUNC ARG LOG EXTRAS...` (prints the
# verdict lines, returns QEMU's status, sets SB_LAST_RC and SB_LAST_WALL), but the VM runs
# in the background while this shell waits for it. QEMU runs under `timeout`, in a process
# group of its own: a Ctrl-C does not reach it, and a shell running the VM in the
# foreground would handle INT/TERM only after the VM has finished. `wait` returns at once
# when a trapped signal arrives, and the trap can end the VM (sb_cleanup).
sb_boot() {
	local rc=0
	sb_bg_boot "$@"
	sb_bg_wait || rc=$?
	sb_verdicts "$3"
	return "$rc"
}

# sb_bg_boot FUNC ARG LOG [EXTRAS...] — start `FUNC ARG LOG EXTRAS...` (a lib.sh boot
# function: boot_vhost, boot_plain, ...) in the background and return at once; its
# verdict lines are not printed (read LOG, or sb_verdicts LOG). SB_BG_PID is the pid to
# end with sb_kill_tree; QEMU starts once LOG.qemu exists (after the machine-wide VM
# lock). Wait for it with sb_bg_wait.
sb_bg_boot() {
	local fn=$1 arg=$2 log=$3
	shift 3
	rm -f "$log.wall"
	(
		r=0
		"$fn" "$arg" "$log" "$@" >/dev/null || r=$?
		echo "$SB_LAST_WALL" >"$log.wall"
		exit "$r"
	) &
	SB_BG_PID=$! SB_BG_LOG=$log
}

# sb_bg_wait — wait for the boot sb_bg_boot started; returns QEMU's status (124: timed
# out) and sets SB_LAST_RC and SB_LAST_WALL (seconds from QEMU start to exit).
sb_bg_wait() {
	local rc=0
	[[ -n $SB_BG_PID ]] || return 0
	wait "$SB_BG_PID" || rc=$?
	SB_BG_PID=''
	# shellcheck disable=SC2034 # lib.sh's globals, read by callers
	SB_LAST_RC=$rc SB_LAST_WALL=$(cat "$SB_BG_LOG.wall" 2>/dev/null || echo 0)
	return "$rc"
}

# sb_bg_running — the boot sb_bg_boot started is still running.
sb_bg_running() { [[ -n $SB_BG_PID ]] && kill -0 "$SB_BG_PID" 2>/dev/null; }

# sb_cleanup — ends what these helpers started and is still running (EXIT traps).
sb_cleanup() {
	if [[ -n $SB_BG_PID ]] && kill -0 "$SB_BG_PID" 2>/dev/null; then
		sb_log "cleanup: killing the background boot (pid $SB_BG_PID) and its QEMU"
		sb_kill_tree "$SB_BG_PID"
		wait "$SB_BG_PID" 2>/dev/null
	fi
	SB_BG_PID=''
	if [[ -n $SB_SERVE_PID ]]; then
		stop_serve 10 || true
	fi
	if [[ -n $SB_EXPORT_PID ]]; then
		stop_export 10 || true
	fi
	stop_nginx
}

# start_export STORE LOG [ARGS...] — `streamboot export --json` on a free loopback port in
# the background, stdout and stderr in LOG. Returns 0 once it printed its ready line
# (SB_EXPORT_ADDR = host:port from it); 1 if it exited or was not ready in 30 s.
start_export() {
	local store=$1 sb n=300
	SB_EXPORT_LOG=$2
	shift 2
	sb=$(sb_streamboot) || return 1
	[[ -z $SB_EXPORT_PID ]] || {
		sb_log "start_export: an export (pid $SB_EXPORT_PID) is running already"
		return 1
	}
	NO_COLOR=1 "$sb" export --json --store "$store" --listen 127.0.0.1:0 "$@" \
		</dev/null >"$SB_EXPORT_LOG" 2>&1 &
	SB_EXPORT_PID=$!
	while ((n-- > 0)); do
		if ! kill -0 "$SB_EXPORT_PID" 2>/dev/null; then
			local rc=0
			wait "$SB_EXPORT_PID" || rc=$?
			sb_log "streamboot export exited early (status $rc): $(tail -n5 "$SB_EXPORT_LOG")"
			SB_EXPORT_PID=''
			return 1
		fi
		SB_EXPORT_ADDR=$(sed -n 's/.*"event":"ready".*"listen":"\([^"]*\)".*/\1/p; s/.*"listen":"\([^"]*\)".*"event":"ready".*/\1/p' "$SB_EXPORT_LOG" | head -n1)
		if [[ -n $SB_EXPORT_ADDR ]]; then
			sb_log "export pid $SB_EXPORT_PID listening on $SB_EXPORT_ADDR"
			return 0
		fi
		sleep 0.1
	done
	sb_log "streamboot export not ready after 30 s: $(tail -n5 "$SB_EXPORT_LOG")"
	sb_kill_tree "$SB_EXPORT_PID"
	wait "$SB_EXPORT_PID" 2>/dev/null
	SB_EXPORT_PID=''
	return 1
}

# stop_export [TIMEOUT] — SIGTERM to the export start_export started (KILL after TIMEOUT
# seconds, default 30). 0 only if it exited with status 0.
stop_export() {
	local pid=$SB_EXPORT_PID t=${1:-30} n rc=0
	[[ -n $pid ]] || return 0
	n=$((t * 10))
	kill -TERM "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null && ((n-- > 0)); do sleep 0.1; done
	if kill -0 "$pid" 2>/dev/null; then
		sb_log "export pid $pid still running ${t}s after SIGTERM: killing it"
		sb_kill_tree "$pid"
	fi
	wait "$pid" 2>/dev/null || rc=$?
	SB_EXPORT_PID=''
	if ((rc != 0)); then
		sb_log "export pid $pid exited with status $rc: $(tail -n5 "$SB_EXPORT_LOG")"
		return 1
	fi
}

# boot_nbd_cow URL LOG [cmdline extras] — boot_nbd with snapshot=on: the NBD export is
# opened read-only and the guest's writes go to a temporary qcow2 overlay QEMU deletes.
boot_nbd_cow() {
	local url=$1 log=$2
	shift 2
	sb_run_vm "$log" "$*" \
		-drive "if=none,id=d0,format=raw,snapshot=on,file=$url" \
		-device "$(sb_virtio_dev blk),drive=d0,num-queues=$SB_QUEUES"
}

# sb_sha256 FILE — the sha256 of FILE alone.
sb_sha256() {
	local s
	s=$(sha256sum "$1") || return 1
	echo "${s%% *}"
}

# sb_since T0 — seconds elapsed since EPOCHREALTIME T0, two decimals.
sb_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
