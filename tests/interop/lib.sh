# shellcheck shell=bash
# Shared helpers of tests/interop/run.sh and benches/dcmtk_side_by_side.sh; sourced, not run:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Provides
#   settings   DCMTK_BIN_DIR, STORESCP, STORESCU (DCMTK by absolute path: pynetdicom puts its
#              own storescp/storescu first on PATH), PY (${PYTHON:-python3}); exports TCP_NODELAY=1
#   logging    log, fail, indent, show_tail
#   checks     need_dcmtk
#   processes  alive, start_bg, stop_bg, forget, stop_all_bg (for the caller's EXIT trap)
#   network    free_ports, wait_port, http_status
#   peers      start_storescp; the two-site chain (storescp behind site-b behind site-a):
#              init_keys, write_configs, start_sites, wait_sites_ready
#
# Globals the caller sets (after sourcing)
#   LOG_TAG        log prefix ("interop", "bench")
#   LOG_FD         where log and show_tail write (default 1; the bench uses 2, its stdout is the table)
#   FAILED         failure counter (fail increments it)
#   BIN            gateway binary (init_keys, start_sites)
#   POLL_INTERVAL  optional: seconds between polls in stop_bg, stop_all_bg, wait_port (default 0.2)
#   P_SCP P_A_DICOM P_A_HTTP P_B_HTTP P_B_LINK   the chain's ports (write_configs, wait_sites_ready)
#
# Globals set here
#   PIDS       background processes still to be stopped (start_bg adds, stop_bg/forget remove)
#   LAST_PID   set by start_bg; LAST_RC: exit status, set by stop_bg
#   SCP_PID    set by start_storescp; GW_PID[a], GW_PID[b]: set by start_sites
#   READY_A READY_B   last /readyz status of the sites, set by wait_sites_ready

DCMTK_BIN_DIR=${DCMTK_BIN_DIR:-/usr/bin}
STORESCP="$DCMTK_BIN_DIR/storescp"
STORESCU="$DCMTK_BIN_DIR/storescu"
PY=${PYTHON:-python3}

# Without it DCMTK waits ~40 ms (delayed ACK) per object.
export TCP_NODELAY=1

POLL_INTERVAL=0.2
PIDS=()
LAST_PID=""
LAST_RC=0
SCP_PID=""
declare -gA GW_PID=([a]="" [b]="")
READY_A=000
READY_B=000

# ------------------------------------------------------------------ logging

log() { printf '[%s %4ds] %s\n' "$LOG_TAG" "$SECONDS" "$*" >&"${LOG_FD:-1}"; }
fail() {
	FAILED=$((FAILED + 1))
	log "FAIL: $*"
}
indent() { sed 's/^/    | /'; }

# checked_script NAME: the pass/fail bookkeeping of a check script. Defines `pass` (and
# uses `fail` above) counting PASSED/FAILED, `summary` printing "NAME: N passed, M failed",
# and an EXIT trap that stops every background process, counts an abort as a failure,
# removes $WORK unless something failed or KEEP=1, and exits 1 on any failure.
checked_script() {
	CHECKED_NAME=$1
	PASSED=${PASSED:-0}
	FAILED=${FAILED:-0}
	SUMMARY_PRINTED=0
	trap checked_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
}
pass() {
	PASSED=$((PASSED + 1))
	log "PASS: $*"
}
summary() {
	SUMMARY_PRINTED=1
	echo "$CHECKED_NAME: $PASSED passed, $FAILED failed"
}
# need_peers_and_gateway: DCMTK, pydicom and pynetdicom, and an executable $BIN; logs the
# binary's version and $WORK. Fails (and returns 1) naming what is missing.
need_peers_and_gateway() {
	need_dcmtk || return 1
	"$PY" -c 'import pydicom, pynetdicom' 2>/dev/null || {
		fail "$PY cannot import pydicom and pynetdicom"
		return 1
	}
	[[ -x $BIN ]] || {
		fail "gateway binary $BIN not found"
		return 1
	}
	log "gateway binary: $BIN ($("$BIN" --version 2>&1 | head -n 1))"
	log "work directory: $WORK"
}
checked_cleanup() {
	local rc=$?
	set +e
	stop_all_bg
	if ((SUMMARY_PRINTED == 0)); then
		log "aborted (exit status $rc)"
		FAILED=$((FAILED + 1))
		summary
	fi
	if ((FAILED == 0)) && [[ ${KEEP:-0} != 1 ]]; then
		rm -rf "$WORK"
	else
		log "work directory kept: $WORK"
	fi
	((FAILED == 0)) || exit 1
	exit "$rc"
}
show_tail() { # file [lines]
	if [[ -s $1 ]]; then
		log "last lines of $1:"
		tail -n "${2:-25}" "$1" | sed 's/\x1b\[[0-9;]*m//g' | indent >&"${LOG_FD:-1}"
	fi
}

need_dcmtk() { # fail (and return 1) unless STORESCP and STORESCU are executable
	local tool
	for tool in "$STORESCP" "$STORESCU"; do
		[[ -x $tool ]] || {
			fail "DCMTK tool $tool not found (apt-get install dcmtk)"
			return 1
		}
	done
}

# ---------------------------------------------------------------- processes

alive() { # pid: running and not a zombie
	local s
	s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	s=${s##*) }
	[[ ${s:0:1} != Z ]]
}

# start_bg LOGFILE CMD...: start CMD in its own process group (setsid), remember it, set LAST_PID.
start_bg() {
	local logf=$1
	shift
	setsid "$@" >"$logf" 2>&1 </dev/null &
	LAST_PID=$!
	PIDS+=("$LAST_PID")
}

# stop_bg PID NAME [TIMEOUT] [group]: SIGTERM (to the process, or its whole group), wait (default
# 30 s), then SIGKILL; forget PID. Sets LAST_RC to the exit status; returns 1 if it had to be killed.
stop_bg() {
	local pid=$1 name=$2 timeout=${3:-30} target=$1 killed=0
	[[ ${4:-} == group ]] && target="-$1"
	if alive "$pid"; then
		kill -TERM -- "$target" 2>/dev/null || true
		local deadline=$((SECONDS + timeout))
		while alive "$pid" && ((SECONDS < deadline)); do sleep "$POLL_INTERVAL"; done
		if alive "$pid"; then
			log "WARN: $name (pid $pid) still running ${timeout}s after SIGTERM, killing it"
			kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
			killed=1
		fi
	fi
	LAST_RC=0
	# shellcheck disable=SC2034 # read by the callers
	wait "$pid" 2>/dev/null || LAST_RC=$?
	# whatever it left in its process group (storescp --fork children)
	kill -KILL -- "-$pid" 2>/dev/null || true
	forget "$pid"
	return $killed
}

forget() { # pid: drop it from PIDS
	local p rest=()
	for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || rest+=("$p"); done
	PIDS=("${rest[@]}")
}

# stop_all_bg: SIGTERM every process (group) in PIDS, give them 10 s together, then SIGKILL and reap.
stop_all_bg() {
	local pid deadline=$((SECONDS + 10))
	for pid in "${PIDS[@]}"; do
		kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		while alive "$pid" && ((SECONDS < deadline)); do sleep "$POLL_INTERVAL"; done
		kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	PIDS=()
}

# ------------------------------------------------------------------ network

free_ports() { # n: print n distinct free loopback ports
	"$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

wait_port() { # port pid timeout: until something listens on the port; 1 if pid exits first or on timeout
	local deadline=$((SECONDS + $3))
	while ((SECONDS < deadline)); do
		alive "$2" || return 1
		if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
		sleep "$POLL_INTERVAL"
	done
	return 1
}

http_status() { # url: print the HTTP status code (000 if none)
	"$PY" - "$1" <<'EOF'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

# -------------------------------------------------------------------- peers

# start_storescp PORT OUTDIR LOGFILE [OPTION...]: `storescp -dhl -aet STORESCP +B OPTION...`
# writing into OUTDIR, started with start_bg; sets SCP_PID. Returns 1 (its log shown) unless
# it listens within 20 s.
start_storescp() {
	local port=$1 out=$2 logf=$3
	shift 3
	mkdir -p "$out"
	start_bg "$logf" "$STORESCP" -dhl -aet STORESCP +B "$@" -od "$out" "$port"
	SCP_PID=$LAST_PID
	if ! wait_port "$port" "$SCP_PID" 20; then
		show_tail "$logf"
		log "storescp did not come up on port $port"
		return 1
	fi
}

# init_keys KEYDIR LOGDIR: KEYDIR/pki (CA, site-a, site-b) and KEYDIR/kek-{a,b}.key, with
# pki.log and kek.log in LOGDIR. Returns non-zero as soon as one step fails.
init_keys() {
	"$BIN" pki init --dir "$1/pki" --site site-a --site site-b >"$2/pki.log" 2>&1 &&
		"$BIN" keys new-kek --out "$1/kek-a.key" >"$2/kek.log" 2>&1 &&
		"$BIN" keys new-kek --out "$1/kek-b.key" >>"$2/kek.log" 2>&1
}

# write_configs CONFDIR [KEYDIR]: CONFDIR/site-a.toml (DICOM listener GW_A on P_A_DICOM, routing to
# site-b) and CONFDIR/site-b.toml (link listener on P_B_LINK, routing to storescp STORESCP on
# P_SCP). The keys of init_keys are in KEYDIR (default: paths relative to CONFDIR).
write_configs() {
	local r=$1 k=${2:+$2/}
	cat >"$r/site-a.toml" <<EOF
[node]
name = "site-a"
data_dir = "data-a"

[keystore]
kek_file = "${k}kek-a.key"

[tls]
cert = "${k}pki/site-a.crt"
key = "${k}pki/site-a.key"
ca = "${k}pki/ca.crt"

[http]
listen = "127.0.0.1:$P_A_HTTP"

[[dicom_listener]]
name = "lan"
listen = "127.0.0.1:$P_A_DICOM"
ae_title = "GW_A"
allowed_calling_ae_titles = []
route_to = ["site-b"]

[[destination]]
name = "site-b"
kind = "gateway"
url = "https://127.0.0.1:$P_B_LINK"
peer_name = "site-b"
EOF
	cat >"$r/site-b.toml" <<EOF
[node]
name = "site-b"
data_dir = "data-b"

[keystore]
kek_file = "${k}kek-b.key"

[tls]
cert = "${k}pki/site-b.crt"
key = "${k}pki/site-b.key"
ca = "${k}pki/ca.crt"

[http]
listen = "127.0.0.1:$P_B_HTTP"

[[link_listener]]
name = "wan"
listen = "127.0.0.1:$P_B_LINK"
allowed_peers = ["site-a"]
route_to = ["pacs"]

[[destination]]
name = "pacs"
kind = "dicom"
address = "127.0.0.1:$P_SCP"
ae_title = "STORESCP"
calling_ae_title = "GW_B"
EOF
}

# start_sites CONFDIR LOGPREFIX: `$BIN serve` site-b, then site-a, with CONFDIR/site-?.toml,
# logging to LOGPREFIXsite-?.log; sets GW_PID[a] and GW_PID[b].
start_sites() {
	GW_PID=([a]="" [b]="")
	start_bg "${2}site-b.log" "$BIN" serve --config "$1/site-b.toml"
	GW_PID[b]=$LAST_PID
	start_bg "${2}site-a.log" "$BIN" serve --config "$1/site-a.toml"
	GW_PID[a]=$LAST_PID
}

# wait_sites_ready TIMEOUT INTERVAL: poll /readyz of both sites (P_A_HTTP, P_B_HTTP) every INTERVAL
# seconds until both answer 200 (return 0), a site exits or TIMEOUT seconds pass (return 1).
# Sets READY_A and READY_B to the last status seen.
wait_sites_ready() {
	local deadline=$((SECONDS + $1))
	READY_A=000 READY_B=000
	while ((SECONDS < deadline)) && alive "${GW_PID[a]}" && alive "${GW_PID[b]}"; do
		[[ $READY_B == 200 ]] || READY_B=$(http_status "http://127.0.0.1:$P_B_HTTP/readyz")
		[[ $READY_A == 200 ]] || READY_A=$(http_status "http://127.0.0.1:$P_A_HTTP/readyz")
		[[ $READY_A == 200 && $READY_B == 200 ]] && return 0
		sleep "$2"
	done
	return 1
}
