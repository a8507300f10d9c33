#!/usr/bin/env bash
# The crash loop of the delivery guarantees:
#
#   DICOM_GATEWAY_BIN=... bash tests/interop/crash_loop.sh [a|b] [KILLS] [OBJECTS]
#
# Objects flow from pynetdicom (crash_sender.py, which retries each object until it is
# acknowledged) into site A, over the link to site B, and on to DCMTK's storescp. Meanwhile
# the chosen site is killed with SIGKILL at random moments, KILLS times (default 30), and
# restarted each time. At every kill the premise is checked and counted: objects were still
# in flight (the sender was sending, or a queue was not empty). At the end:
#   - lost: acknowledged objects that never reached storescp: must be 0;
#   - corrupted: files at storescp whose data set matches nothing that was sent: must be 0;
#   - duplicates: extra identical copies (an ack lost in a kill makes the sender re-send):
#     allowed, reported.
# Prints `crash_loop(site X): N passed, M failed`.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
LOG_TAG=crash
FAILED=0
BIN=${DICOM_GATEWAY_BIN:?set DICOM_GATEWAY_BIN to the dicom-gateway binary}
VICTIM=${1:-a}
KILLS=${2:-30}
OBJECTS=${3:-1000}
[[ $VICTIM == a || $VICTIM == b ]] || { echo "usage: $0 [a|b] [KILLS] [OBJECTS]" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dicomgw-crash.XXXXXX")
cleanup() {
	stop_all_bg
	rm -rf "$WORK"
}
trap cleanup EXIT

read -r P_SCP P_A_DICOM P_A_HTTP P_B_HTTP P_B_LINK < <(free_ports 5)
init_keys "$WORK" "$WORK"
write_configs "$WORK"
start_storescp "$P_SCP" "$WORK/pacs" "$WORK/storescp.log"
start_sites "$WORK" "$WORK/"
wait_sites_ready 60 0.2 || { show_tail "$WORK/site-a.log"; show_tail "$WORK/site-b.log"; exit 1; }
log "sites up; sending $OBJECTS objects, killing site $VICTIM $KILLS times"

# The flow is spread over at least 4 s per kill (a kill, a restart and the pause before the
# next take about 2.5 s), so the kills hit a live flow however fast this machine sends.
start_bg "$WORK/sender.log" "$PY" "$HERE/crash_sender.py" 127.0.0.1 "$P_A_DICOM" GW_A "$OBJECTS" "$WORK" $((KILLS * 4))
SENDER=$LAST_PID

queued() { # site: objects queued at that site (empty if it does not answer)
	"$BIN" status --config "$WORK/site-$1.toml" --json 2>/dev/null |
		"$PY" -c 'import json,sys; print(sum(d["queued"] for d in json.load(sys.stdin)["destinations"]))' 2>/dev/null || true
}

# Mid-transfer means mid-transfer: start killing once objects are being acknowledged.
deadline=$((SECONDS + 120))
until [[ -s $WORK/acked.tsv ]] || ! alive "$SENDER" || ((SECONDS > deadline)); do sleep 0.1; done
[[ -s $WORK/acked.tsv ]] || { fail "the sender acknowledged nothing"; show_tail "$WORK/sender.log"; exit 1; }

in_flight=0
for ((i = 1; i <= KILLS; i++)); do
	sleep "$("$PY" -c 'import random; print(round(random.uniform(0.2, 1.2), 2))')"
	acked=$( (wc -l <"$WORK/acked.tsv") 2>/dev/null || echo 0)
	qa=$(queued a)
	qb=$(queued b)
	if { alive "$SENDER" && ((acked < OBJECTS)); } || [[ ${qa:-0} != 0 || ${qb:-0} != 0 ]]; then
		in_flight=$((in_flight + 1))
	fi
	pid=${GW_PID[$VICTIM]}
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	forget "$pid"
	log "kill $i: site $VICTIM (acked so far $acked, queued at A ${qa:-?}, at B ${qb:-?})"
	echo "=== restart $i" >>"$WORK/site-$VICTIM.log"
	setsid "$BIN" serve --config "$WORK/site-$VICTIM.toml" >>"$WORK/site-$VICTIM.log" 2>&1 </dev/null &
	GW_PID[$VICTIM]=$!
	PIDS+=("${GW_PID[$VICTIM]}")
	if ! wait_sites_ready 60 0.1; then
		fail "site $VICTIM did not come back after kill $i"
		show_tail "$WORK/site-$VICTIM.log"
		exit 1
	fi
done
log "kills done ($in_flight of $KILLS with objects in flight); waiting for the sender and the deliveries"
# The premise: the kills hit a live flow.
if ((in_flight * 10 < KILLS * 9)); then
	fail "only $in_flight of $KILLS kills happened with objects in flight"
fi

deadline=$((SECONDS + 300))
while alive "$SENDER" && ((SECONDS < deadline)); do sleep 0.5; done
alive "$SENDER" && fail "the sender did not finish"
tail -n 1 "$WORK/sender.log" | indent

while ((SECONDS < deadline)); do
	[[ $(queued a) == 0 && $(queued b) == 0 ]] && break
	sleep 0.5
done
# No wait for storescp: with +B it writes each object straight into its file and closes
# it before it sends the C-STORE response, and B empties its queue only after that
# response, so every file is complete once both queues are empty.
result=$("$PY" "$HERE/compare_acked.py" "$WORK")
read -r n_acked n_sent n_lost n_corrupt n_dups <<<"$result"
log "acknowledged $n_acked of $n_sent; lost $n_lost, corrupted $n_corrupt, identical duplicates $n_dups"
((n_acked == n_sent)) || fail "only $n_acked of $n_sent objects were acknowledged"
((n_lost == 0)) || fail "$n_lost acknowledged objects were lost"
((n_corrupt == 0)) || fail "$n_corrupt corrupted objects reached the PACS"
bad_lines=$(grep -h "ERROR\|panicked" "$WORK"/site-?.log | grep -v "could not record" | head -5 || true)
if [[ -n $bad_lines ]]; then
	printf '%s\n' "$bad_lines" | indent
	fail "ERROR lines or panics in the gateway logs"
fi
checks=5
echo "crash_loop(site $VICTIM): $((checks - FAILED)) passed, $FAILED failed"
((FAILED == 0))
