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
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"
LOG_TAG=interop
BIN=${DICOM_GATEWAY_BIN:-${CARGO_TARGET_DIR:-target}/release/dicom-gateway}
[[ $BIN == /* ]] || BIN="$PWD/$BIN"
DIRECT_ONLY=${INTEROP_DIRECT_ONLY:-0}
KEEP=${INTEROP_KEEP:-0}
DELIVERY_TIMEOUT=${INTEROP_DELIVERY_TIMEOUT:-300}
STUDY_SIZE=${INTEROP_STUDY_SIZE:-300}
STALL_TIMEOUT=${INTEROP_STALL_TIMEOUT:-120}
SETTLE=${INTEROP_SETTLE:-5}
MIN_DIRECT=250
SENDERS=(dcmtk pynetdicom)

PASSED=0
FAILED=0
SUMMARY_PRINTED=0
WORK=""

pass() {
	PASSED=$((PASSED + 1))
	log "PASS: $*"
}
summary() {
	SUMMARY_PRINTED=1
	echo "interop: $PASSED passed, $FAILED failed"
}

# ------------------------------------------------------------------ cleanup

cleanup() {
	local rc=$?
	set +e
	stop_all_bg
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
	start_storescp "$port" "$dir" "$WORK/logs/storescp-direct-$s.log" --fork +xa +uf
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

	if ! init_keys "$RUN" "$RUN"; then
		show_tail "$RUN/pki.log"
		show_tail "$RUN/kek.log"
		fail "[$s] gateway: pki init / keys new-kek failed"
		return 0
	fi
	write_configs "$RUN"

	start_storescp "$P_SCP" "$gw_dir" "$WORK/logs/storescp-gw-$s.log" --fork +xa +uf
	start_sites "$RUN" "$RUN/"

	if ! wait_sites_ready 60 0.5; then
		show_tail "$RUN/site-b.log"
		show_tail "$RUN/site-a.log"
		fail "[$s] gateway: nodes not ready within 60s (site-a /readyz: $READY_A, site-b /readyz: $READY_B)"
		stop_gateways "$s" quiet
		stop_storescp
		return 0
	fi
	log "[$s] site-a and site-b ready"

	send "$s" "$P_A_DICOM" GW_A "$WORK/logs/send-gw-$s.log"

	local want=${DIRECT_COUNT[$s]} have last=-1 last_change=$SECONDS next_report=$((SECONDS + 15))
	local deadline=$((SECONDS + DELIVERY_TIMEOUT))
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
need_dcmtk || exit 1
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
