#!/usr/bin/env bash
# Interop test: real DICOM peers through two gateway nodes.
#
#   sender (DCMTK storescu | pynetdicom) --DICOM--> site A --TLS link--> site B --DICOM--> DCMTK storescp
#
# compared, data set by data set, with the same sender talking to storescp
# directly. See tests/interop/README.md. Run from the repository root:
#
#   bash tests/interop/run.sh
#
# Environment:
#   DICOM_GATEWAY_BIN         gateway binary (default ${CARGO_TARGET_DIR:-target}/release/dicom-gateway)
#   INTEROP_DIRECT_ONLY=1     only the direct sends and the compare self-tests (no gateway needed)
#   INTEROP_KEEP=1            keep the work directory (it is always kept when something failed)
#   INTEROP_DELIVERY_TIMEOUT  seconds to wait for delivery through the gateways (default 300)
#   INTEROP_STALL_TIMEOUT     ... and give up earlier once no new object arrived for this long (default 120)
#   INTEROP_STUDY_SIZE        number of generated objects (default 300)
#   DCMTK_BIN_DIR             where DCMTK's storescp/storescu are (default /usr/bin; pynetdicom
#                             puts its own storescp/storescu first on PATH, so never rely on PATH)
#   PYTHON                    python interpreter with pydicom and pynetdicom (default python3)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=${DICOM_GATEWAY_BIN:-${CARGO_TARGET_DIR:-target}/release/dicom-gateway}
[[ $BIN == /* ]] || BIN="$PWD/$BIN"
DIRECT_ONLY=${INTEROP_DIRECT_ONLY:-0}
KEEP=${INTEROP_KEEP:-0}
DELIVERY_TIMEOUT=${INTEROP_DELIVERY_TIMEOUT:-300}
STUDY_SIZE=${INTEROP_STUDY_SIZE:-300}
STALL_TIMEOUT=${INTEROP_STALL_TIMEOUT:-120}
SETTLE=${INTEROP_SETTLE:-5}
MIN_DIRECT=250
DCMTK_BIN_DIR=${DCMTK_BIN_DIR:-/usr/bin}
STORESCP="$DCMTK_BIN_DIR/storescp"
STORESCU="$DCMTK_BIN_DIR/storescu"
PY=${PYTHON:-python3}
SENDERS=(dcmtk pynetdicom)

# Without it DCMTK waits ~40 ms (delayed ACK) per object.
export TCP_NODELAY=1

PASSED=0
FAILED=0
SUMMARY_PRINTED=0
PIDS=()
WORK=""

log() { printf '[interop %4ds] %s\n' "$SECONDS" "$*"; }
pass() {
	PASSED=$((PASSED + 1))
	log "PASS: $*"
}
fail() {
	FAILED=$((FAILED + 1))
	log "FAIL: $*"
}
indent() { sed 's/^/    | /'; }
show_tail() { # file [lines]
	if [[ -s $1 ]]; then
		log "last lines of $1:"
		tail -n "${2:-25}" "$1" | sed 's/\x1b\[[0-9;]*m//g' | indent
	fi
}
summary() {
	SUMMARY_PRINTED=1
	echo "interop: $PASSED passed, $FAILED failed"
}

# --------------------------------------------------------------- processes

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

# stop_bg PID NAME [TIMEOUT] [group]: SIGTERM (to the process, or its whole group), wait, then SIGKILL.
# Sets LAST_RC to the exit status; returns 1 if it had to be killed.
stop_bg() {
	local pid=$1 name=$2 timeout=${3:-30} target=$1 killed=0
	[[ ${4:-} == group ]] && target="-$1"
	if alive "$pid"; then
		kill -TERM -- "$target" 2>/dev/null || true
		local deadline=$((SECONDS + timeout))
		while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
		if alive "$pid"; then
			log "WARN: $name (pid $pid) still running ${timeout}s after SIGTERM, killing it"
			kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
			killed=1
		fi
	fi
	LAST_RC=0
	wait "$pid" 2>/dev/null || LAST_RC=$?
	# whatever it left in its process group (storescp --fork children)
	kill -KILL -- "-$pid" 2>/dev/null || true
	local p rest=()
	for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || rest+=("$p"); done
	PIDS=("${rest[@]}")
	return $killed
}

cleanup() {
	local rc=$?
	set +e
	local pid
	for pid in "${PIDS[@]}"; do
		kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
	done
	local deadline=$((SECONDS + 10))
	for pid in "${PIDS[@]}"; do
		while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
		kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	if ((SUMMARY_PRINTED == 0)); then
		log "aborted (exit status $rc)"
		FAILED=$((FAILED + 1))
		summary
	fi
	if [[ -n $WORK && -d $WORK ]]; then
		if ((FAILED == 0)) && [[ $KEEP != 1 ]]; then
			rm -rf "$WORK"
		else
			log "work directory kept: $WORK"
		fi
	fi
	((FAILED == 0)) || exit 1
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ helpers

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

wait_port() { # port pid timeout
	local deadline=$((SECONDS + $3))
	while ((SECONDS < deadline)); do
		alive "$2" || return 1
		if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
		sleep 0.2
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

http_get() { # url file
	"$PY" - "$1" "$2" <<'EOF' || true
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r, open(sys.argv[2], "wb") as f:
        f.write(r.read())
except Exception as e:
    print("GET %s failed: %s" % (sys.argv[1], e))
EOF
}

count_files() { { find "$1" -type f 2>/dev/null || true; } | wc -l; }

start_storescp() { # port outdir logfile
	mkdir -p "$2"
	start_bg "$3" "$STORESCP" --fork -dhl -aet STORESCP +B +xa +uf -od "$2" "$1"
	SCP_PID=$LAST_PID
	if ! wait_port "$1" "$SCP_PID" 20; then
		show_tail "$3"
		log "storescp did not come up on port $1"
		return 1
	fi
}

stop_storescp() {
	stop_bg "$SCP_PID" storescp 10 group || true
}

# send SENDER PORT CALLED_AE LOGFILE: send every input; print and set SENT_OK.
send() {
	local sender=$1 port=$2 called=$3 logf=$4 rc=0
	: >"$logf"
	case $sender in
	dcmtk)
		local list profile
		local -a files
		for list in "$INPUTS"/storescu-GROUP*.txt; do
			profile=$(basename "$list" .txt)
			profile=${profile#storescu-}
			mapfile -t files <"$list"
			# -xf: one presentation context per (SOP class, TS) pair of the inputs, each with the
			#      file's own TS only, so nothing is converted; -nh: go on after a failed store.
			timeout 900 "$STORESCU" -v -nh -to 30 -ta 30 -td 120 -aet INTEROP_SCU -aec "$called" \
				-xf "$INPUTS/storescu.cfg" "$profile" 127.0.0.1 "$port" "${files[@]}" >>"$logf" 2>&1 || rc=$?
		done
		SENT_OK=$(grep -c 'Received Store Response (Success)' "$logf" || true)
		log "  storescu: $SENT_OK/$N_INPUTS stored (exit status $rc; log $logf)"
		;;
	pynetdicom)
		# 16 contexts per association: the 30-odd (SOP class, TS) pairs need several associations.
		timeout 900 "$PY" "$HERE/send_pynetdicom.py" 127.0.0.1 "$port" --called-ae "$called" \
			--calling-ae INTEROP_PY --max-contexts 16 --timeout 60 --file-list "$INPUTS/all.txt" \
			>"$logf" 2>&1 || rc=$?
		SENT_OK=$(sed -n 's/^pynetdicom: \([0-9]*\)\/.*stored.*/\1/p' "$logf" | tail -n 1)
		SENT_OK=${SENT_OK:-0}
		log "  $(grep '^pynetdicom: [0-9]*/' "$logf" | tail -n 1 || echo "pynetdicom: no summary") (exit status $rc)"
		;;
	esac
}

# ---------------------------------------------------------------- the runs

direct_run() { # sender
	local s=$1 port dir
	dir="$WORK/out/direct-$s"
	read -r port <<<"$(free_ports 1)"
	log "[$s] direct: $s -> storescp :$port"
	start_storescp "$port" "$dir" "$WORK/logs/storescp-direct-$s.log"
	send "$s" "$port" STORESCP "$WORK/logs/send-direct-$s.log"
	stop_storescp
	DIRECT_COUNT[$s]=$(count_files "$dir")
	if ((DIRECT_COUNT[$s] >= MIN_DIRECT)); then
		pass "[$s] direct: storescp received ${DIRECT_COUNT[$s]} objects (>= $MIN_DIRECT) of $N_INPUTS inputs"
	else
		show_tail "$WORK/logs/send-direct-$s.log"
		fail "[$s] direct: storescp received ${DIRECT_COUNT[$s]} objects, need >= $MIN_DIRECT"
	fi
	log "[$s] compare self-test on $dir"
	if "$PY" "$HERE/compare.py" --self-test "$dir" >"$WORK/logs/selftest-$s.log" 2>&1; then
		indent <"$WORK/logs/selftest-$s.log"
		pass "[$s] compare.py detects changed, missing, extra, TS and SOP class differences"
	else
		indent <"$WORK/logs/selftest-$s.log"
		fail "[$s] compare.py self-test"
	fi
}

write_configs() { # rundir
	local r=$1
	cat >"$r/site-a.toml" <<EOF
[node]
name = "site-a"
data_dir = "data-a"

[keystore]
kek_file = "kek-a.key"

[tls]
cert = "pki/site-a.crt"
key = "pki/site-a.key"
ca = "pki/ca.crt"

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
kek_file = "kek-b.key"

[tls]
cert = "pki/site-b.crt"
key = "pki/site-b.key"
ca = "pki/ca.crt"

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

stop_gateways() { # sender [quiet]
	local name pid
	for name in a b; do
		pid=${GW_PID[$name]:-}
		[[ -n $pid ]] || continue
		if stop_bg "$pid" "site-$name" 30; then
			log "[$1] site-$name stopped (exit status $LAST_RC)"
		else
			log "WARN: [$1] site-$name did not stop on SIGTERM within 30s"
		fi
		((LAST_RC == 0)) || [[ ${2:-} == quiet ]] || show_tail "$RUN/site-$name.log" 15
		GW_PID[$name]=""
	done
}

gateway_run() { # sender
	local s=$1 gw_dir direct_dir
	RUN="$WORK/gw-$s"
	gw_dir="$WORK/out/gw-$s"
	direct_dir="$WORK/out/direct-$s"
	mkdir -p "$RUN"
	read -r P_SCP P_A_DICOM P_A_HTTP P_B_HTTP P_B_LINK <<<"$(free_ports 5)"
	log "[$s] through the gateways: $s -> site-a :$P_A_DICOM -> site-b :$P_B_LINK -> storescp :$P_SCP"

	if ! "$BIN" pki init --dir "$RUN/pki" --site site-a --site site-b >"$RUN/pki.log" 2>&1 ||
		! "$BIN" keys new-kek --out "$RUN/kek-a.key" >"$RUN/kek.log" 2>&1 ||
		! "$BIN" keys new-kek --out "$RUN/kek-b.key" >>"$RUN/kek.log" 2>&1; then
		show_tail "$RUN/pki.log"
		show_tail "$RUN/kek.log"
		fail "[$s] gateway: pki init / keys new-kek failed"
		return 0
	fi
	write_configs "$RUN"

	start_storescp "$P_SCP" "$gw_dir" "$WORK/logs/storescp-gw-$s.log"
	GW_PID=([a]="" [b]="")
	start_bg "$RUN/site-b.log" "$BIN" serve --config "$RUN/site-b.toml"
	GW_PID[b]=$LAST_PID
	start_bg "$RUN/site-a.log" "$BIN" serve --config "$RUN/site-a.toml"
	GW_PID[a]=$LAST_PID

	local deadline=$((SECONDS + 60)) ready_a=000 ready_b=000
	while ((SECONDS < deadline)); do
		if ! alive "${GW_PID[a]}" || ! alive "${GW_PID[b]}"; then break; fi
		[[ $ready_b == 200 ]] || ready_b=$(http_status "http://127.0.0.1:$P_B_HTTP/readyz")
		[[ $ready_a == 200 ]] || ready_a=$(http_status "http://127.0.0.1:$P_A_HTTP/readyz")
		[[ $ready_a == 200 && $ready_b == 200 ]] && break
		sleep 0.5
	done
	if [[ $ready_a != 200 || $ready_b != 200 ]]; then
		show_tail "$RUN/site-b.log"
		show_tail "$RUN/site-a.log"
		fail "[$s] gateway: nodes not ready within 60s (site-a /readyz: $ready_a, site-b /readyz: $ready_b)"
		stop_gateways "$s" quiet
		stop_storescp
		return 0
	fi
	log "[$s] site-a and site-b ready"

	send "$s" "$P_A_DICOM" GW_A "$WORK/logs/send-gw-$s.log"

	local want=${DIRECT_COUNT[$s]} have last=-1 last_change=$SECONDS next_report=$((SECONDS + 15))
	deadline=$((SECONDS + DELIVERY_TIMEOUT))
	while :; do
		have=$(count_files "$gw_dir")
		((have >= want)) && break
		if ((have != last)); then
			last=$have
			last_change=$SECONDS
		fi
		if ((SECONDS >= deadline)); then
			log "[$s] delivery timeout after ${DELIVERY_TIMEOUT}s: $have of $want objects arrived"
			break
		fi
		if ((SECONDS - last_change >= STALL_TIMEOUT)); then
			log "[$s] no new object for ${STALL_TIMEOUT}s: $have of $want objects arrived, giving up"
			break
		fi
		if ! alive "${GW_PID[a]}" || ! alive "${GW_PID[b]}"; then
			log "[$s] a gateway node exited while delivering ($have of $want objects arrived)"
			break
		fi
		if ((SECONDS >= next_report)); then
			log "[$s]   $have/$want objects delivered so far"
			next_report=$((SECONDS + 15))
		fi
		sleep 1
	done
	sleep "$SETTLE" # catch duplicates arriving late
	log "[$s] $(count_files "$gw_dir") objects delivered through the gateways ($want directly)"
	http_get "http://127.0.0.1:$P_A_HTTP/metrics" "$RUN/metrics-a.txt"
	http_get "http://127.0.0.1:$P_B_HTTP/metrics" "$RUN/metrics-b.txt"
	stop_gateways "$s"
	stop_storescp

	if "$PY" "$HERE/compare.py" "$direct_dir" "$gw_dir" >"$WORK/logs/compare-$s.log" 2>&1; then
		tail -n 1 "$WORK/logs/compare-$s.log" | indent
		pass "[$s] every data set received directly arrived through the gateways, byte for byte, once, same TS and SOP class"
	else
		head -n 60 "$WORK/logs/compare-$s.log" | indent
		show_tail "$RUN/site-a.log" 15
		show_tail "$RUN/site-b.log" 15
		fail "[$s] direct vs. through-the-gateways comparison (log $WORK/logs/compare-$s.log)"
	fi
}

scan_check() {
	local present=() absent=() s
	for s in "${SENDERS[@]}"; do
		present+=("$WORK/out/direct-$s")
		absent+=("$WORK/gw-$s/data-a" "$WORK/gw-$s/data-b")
	done
	log "scan: looking for sent markers in the gateways' data directories"
	if "$PY" "$HERE/compare.py" --scan "$INPUTS/markers.json" --present "${present[@]}" \
		--absent "${absent[@]}" >"$WORK/logs/scan.log" 2>&1; then
		indent <"$WORK/logs/scan.log"
		pass "no patient name, UID or pixel bytes in clear in the gateways' data dirs (and all present in storescp's output)"
	else
		indent <"$WORK/logs/scan.log"
		fail "plaintext scan of the gateways' data dirs"
	fi
}

# -------------------------------------------------------------------- main

log "interop test starting (direct only: $DIRECT_ONLY)"
for tool in "$STORESCP" "$STORESCU"; do
	[[ -x $tool ]] || {
		fail "DCMTK tool $tool not found (apt-get install dcmtk)"
		exit 1
	}
done
"$PY" -c 'import pydicom, pynetdicom' 2>/dev/null || {
	fail "$PY cannot import pydicom and pynetdicom"
	exit 1
}
if [[ $DIRECT_ONLY != 1 ]]; then
	[[ -x $BIN ]] || {
		fail "gateway binary $BIN not found (cargo build --release, or set DICOM_GATEWAY_BIN)"
		exit 1
	}
	log "gateway binary: $BIN"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dicom-gateway-interop.XXXXXX")
INPUTS="$WORK/inputs"
mkdir -p "$WORK/logs" "$WORK/out"
log "work directory: $WORK"

"$PY" "$HERE/gen_study.py" "$INPUTS" --count "$STUDY_SIZE" | indent
cut -f1 "$INPUTS/manifest.tsv" >"$INPUTS/all.txt"
N_INPUTS=$(wc -l <"$INPUTS/all.txt")
log "$N_INPUTS input objects ($(grep -c $'\tpydicom$' "$INPUTS/manifest.tsv") pydicom test files, $(grep -c $'\tstudy$' "$INPUTS/manifest.tsv") generated)"

declare -A DIRECT_COUNT=()
declare -A GW_PID=()
for s in "${SENDERS[@]}"; do
	direct_run "$s"
	if [[ $DIRECT_ONLY != 1 ]]; then
		gateway_run "$s"
	fi
done
if [[ $DIRECT_ONLY != 1 ]]; then
	scan_check
fi

summary
