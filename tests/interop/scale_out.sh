#!/usr/bin/env bash
# Scale-out (issue 10): two shared-nothing replicas per site, behind a DICOM Service and a
# link Service, on loopback.
#
#   DICOM_GATEWAY_BIN=... bash tests/interop/scale_out.sh
#
#                      ┌─▶ A1 ─┐                    ┌─▶ B1 ─┐
#   sender (pynetdicom)┤       ├─TLS─▶ link Service ┤       ├─DICOM─▶ DCMTK storescp
#                      └─▶ A2 ─┘    (TCP round robin)└─▶ B2 ─┘
#
# A1 and A2 are two site-a nodes, B1 and B2 two site-b nodes, as the replicas of a
# StatefulSet: each its own data directory (RocksDB, spool), the site's one certificate,
# KEK and node name. The link Service is scale_tool.py lb: per-connection round robin over
# B1's and B2's link ports, plain TCP passthrough (TLS and the peer identity end to end),
# skipping a backend that refuses. Both A replicas' destination is the balancer. The DICOM
# Service is the sender (scale_tool.py send): associations of 20 objects, round robin over
# A1 and A2, two at a time, each object retried until acknowledged.
#   1. Steady: a generated study (gen_study.py, 400 objects by default). Checks: every object
#      arrives at storescp once, with its data set byte for byte (SHA-256 after the file
#      meta). Premises: both A replicas acknowledged some (the sender's record and each
#      node's received_objects_total{listener="lan"}), both B replicas stored some
#      (received_objects_total{listener="wan"}, summing to the study: stored once at site B),
#      the balancer gave each backend connections.
#   2. A replica goes away: storescp is stopped and another study (600 objects) flows in,
#      so that B1 holds objects it acknowledged and cannot deliver yet, and site B's
#      max_queue (100) makes it answer 503 so that site A keeps a queue. Once B1 holds 50
#      and site A 20, B1 is SIGKILLed and storescp started again. B2 stays up: A's retries
#      land on B2 through the balancer (premise: B2 got a new connection and stored more
#      after the kill). Once site A is empty, B1 is restarted from its data directory and
#      must deliver what it held (forwarded_objects_total after the restart). Checks: 0 lost (every acknowledged object arrives), 0
#      corrupted, duplicates only as identical re-sends and at most what can have been in
#      flight at the kill (site A's requests on the link, max_in_flight = 32, plus B1's one
#      association), each listed; nothing queued, in flight or dead at any of the four nodes.
#   Also: no ERROR line or panic in the logs, and a self-test of the checks.
# Prints `scale_out: N passed, M failed`; exits non-zero on failure.
#
# Environment: SCALE_STEADY (objects of scenario 1, default 400), SCALE_KILL (of scenario 2,
# default 600), SCALE_DEADLINE (seconds each wait may take, default 60), SCALE_KEEP=1 keeps
# the work directory (it is always kept on failure), PYTHON, DCMTK_BIN_DIR.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"
LOG_TAG=scale_out
FAILED=0
PASSED=0
BIN=${DICOM_GATEWAY_BIN:?set DICOM_GATEWAY_BIN to the dicom-gateway binary}
[[ $BIN == /* ]] || BIN="$PWD/$BIN"
N_STEADY=${SCALE_STEADY:-400}
N_KILL=${SCALE_KILL:-600}
DEADLINE=${SCALE_DEADLINE:-60}
KEEP=${SCALE_KEEP:-0}
# Site B's PACS destination takes this many waiting objects, then site B answers 503 and
# site A keeps the rest (scenario 2 fills it while the PACS is down).
B_MAX_QUEUE=100
# What can be in flight when B1 dies: site A's link requests on B1's connection (the
# destination's max_in_flight, default 32) and B1's one association to the PACS.
MAX_DUPS=33
TOOL=("$PY" "$HERE/scale_tool.py")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dicomgw-scale.XXXXXX")

checked_script "scale_out"

need_peers_and_gateway || exit 1
mkdir -p "$WORK/logs"

# ------------------------------------------------------------ the four nodes
NODES=(a1 a2 b1 b2)
read -r P_SCP P_LB P_A1 P_A1_HTTP P_A2 P_A2_HTTP P_B1 P_B1_HTTP P_B2 P_B2_HTTP < <(free_ports 10)
declare -A HTTP=([a1]=$P_A1_HTTP [a2]=$P_A2_HTTP [b1]=$P_B1_HTTP [b2]=$P_B2_HTTP)
declare -A PORT=([a1]=$P_A1 [a2]=$P_A2 [b1]=$P_B1 [b2]=$P_B2)
declare -A NODE_PID=()

init_keys "$WORK" "$WORK/logs" || {
	show_tail "$WORK/logs/pki.log"
	show_tail "$WORK/logs/kek.log"
	fail "key setup failed"
	exit 1
}

# write_a NODE / write_b NODE: $WORK/NODE.toml, data in $WORK/data-NODE; the site's one
# name, certificate and KEK, as for the replicas of one StatefulSet.
write_a() {
	cat >"$WORK/$1.toml" <<EOF
[node]
name = "site-a"
data_dir = "data-$1"

[keystore]
kek_file = "kek-a.key"

[tls]
cert = "pki/site-a.crt"
key = "pki/site-a.key"
ca = "pki/ca.crt"

[http]
listen = "127.0.0.1:${HTTP[$1]}"

[[dicom_listener]]
name = "lan"
listen = "127.0.0.1:${PORT[$1]}"
ae_title = "GW_A"
allowed_calling_ae_titles = []
route_to = ["site-b"]

[[destination]]
name = "site-b"
kind = "gateway"
url = "https://127.0.0.1:$P_LB"
peer_name = "site-b"
EOF
}
write_b() {
	cat >"$WORK/$1.toml" <<EOF
[node]
name = "site-b"
data_dir = "data-$1"

[keystore]
kek_file = "kek-b.key"

[tls]
cert = "pki/site-b.crt"
key = "pki/site-b.key"
ca = "pki/ca.crt"

[http]
listen = "127.0.0.1:${HTTP[$1]}"

[[link_listener]]
name = "wan"
listen = "127.0.0.1:${PORT[$1]}"
allowed_peers = ["site-a"]
route_to = ["pacs"]

[[destination]]
name = "pacs"
kind = "dicom"
address = "127.0.0.1:$P_SCP"
ae_title = "STORESCP"
calling_ae_title = "GW_B"
max_queue = $B_MAX_QUEUE
EOF
}
write_a a1
write_a a2
write_b b1
write_b b2

start_node() { # node [log suffix]: `serve` it; NODE_PID[node]
	start_bg "$WORK/logs/$1${2:-}.log" "$BIN" serve --config "$WORK/$1.toml"
	NODE_PID[$1]=$LAST_PID
}

wait_ready() { # node...: until each answers 200 on /readyz; 1 if one exits or after DEADLINE s
	local n st deadline=$((SECONDS + DEADLINE))
	for n in "$@"; do
		st=000
		while ((SECONDS < deadline)) && alive "${NODE_PID[$n]}"; do
			st=$(http_status "http://127.0.0.1:${HTTP[$n]}/readyz")
			[[ $st == 200 ]] && break
			sleep 0.2
		done
		if [[ $st != 200 ]]; then
			show_tail "$WORK/logs/$n.log"
			fail "$n did not become ready (/readyz $st)"
			return 1
		fi
	done
}

metric() { # node name [label=value...]: its value, empty if the node does not answer
	"${TOOL[@]}" metric "${HTTP[$1]}" "${@:2}" 2>/dev/null || true
}

counts() { # node...: "queued in_flight dead" summed over the node's destinations, per node
	local n files=()
	for n in "$@"; do
		"$BIN" status --config "$WORK/$n.toml" --json >"$WORK/status-$n.json" 2>/dev/null || : >"$WORK/status-$n.json"
		files+=("$WORK/status-$n.json")
	done
	"${TOOL[@]}" queue "${files[@]}"
}

queued_sum() { # node...: objects waiting at those nodes together, "x" if one does not answer
	counts "$@" | awk '$1 == "-" {bad = 1} {s += $1} END {print bad ? "x" : s}'
}

pacs_files() { find "$WORK/pacs" -type f | wc -l; }

lb_stat() { # backend-index field: from the balancer's stats
	"$PY" -c 'import json,sys; s = json.load(open(sys.argv[1])); print(s["backends"][int(sys.argv[2])][sys.argv[3]])' \
		"$WORK/lb.json" "$1" "$2" 2>/dev/null || echo 0
}

# settle NODES...: until nothing waits at the given nodes and storescp's file count has not
# moved for a second (so a late write is counted); 1 after DEADLINE s.
settle() {
	local deadline=$((SECONDS + DEADLINE)) last=-1 since=$SECONDS now q
	while ((SECONDS < deadline)); do
		q=$(queued_sum "$@")
		now=$(pacs_files)
		if ((now != last)); then
			last=$now
			since=$SECONDS
		fi
		[[ $q == 0 ]] && ((SECONDS - since >= 1)) && return 0
		sleep 0.3
	done
	return 1
}

# report the checks of scale_tool.py check (PASS/FAIL/DETAIL lines); sets COUNTS
report() {
	local verdict text
	COUNTS=""
	while IFS=$'\t' read -r verdict text; do
		case $verdict in
		PASS) pass "$1: $text" ;;
		FAIL) fail "$1: $text" ;;
		DETAIL) printf '%s\n' "$text" | indent ;;
		COUNTS) COUNTS=$text ;;
		*) printf '%s\t%s\n' "$verdict" "$text" | indent ;;
		esac
	done <"$2"
	[[ -n $COUNTS ]] || fail "$1: the check did not run (log $2)"
}

start_storescp "$P_SCP" "$WORK/pacs" "$WORK/logs/storescp.log" --fork +uf || {
	fail "storescp did not start"
	exit 1
}
start_bg "$WORK/logs/lb.log" "${TOOL[@]}" lb "$P_LB" "$WORK/lb.json" "$P_B1" "$P_B2"
LB_PID=$LAST_PID
wait_port "$P_LB" "$LB_PID" 20 || {
	show_tail "$WORK/logs/lb.log"
	fail "the balancer did not come up"
	exit 1
}
start_node b1
start_node b2
wait_ready b1 b2 || exit 1
start_node a1
start_node a2
wait_ready a1 a2 || exit 1
log "A1 :$P_A1, A2 :$P_A2 -> link Service :$P_LB -> B1 :$P_B1, B2 :$P_B2 -> storescp :$P_SCP; all four ready"

# ------------------------------------------------------------ 1. steady
if ! "$PY" "$HERE/gen_study.py" "$WORK/gen-steady" --count "$N_STEADY" >"$WORK/logs/gen-steady.log" 2>&1 ||
	! "$PY" "$HERE/gen_study.py" "$WORK/gen-kill" --count "$N_KILL" >"$WORK/logs/gen-kill.log" 2>&1; then
	show_tail "$WORK/logs/gen-steady.log"
	show_tail "$WORK/logs/gen-kill.log"
	fail "generating the studies failed"
	exit 1
fi
mkdir -p "$WORK/steady" "$WORK/kill"
log "steady: sending $N_STEADY objects over A1 and A2"
t0=$SECONDS
"${TOOL[@]}" send "$WORK/steady" "$WORK/gen-steady/study" 127.0.0.1 "$P_A1" "$P_A2" >"$WORK/logs/send-steady.log" 2>&1 || {
	show_tail "$WORK/logs/send-steady.log"
	fail "steady: the sender did not get every object acknowledged"
}
log "$(tail -n 1 "$WORK/logs/send-steady.log")"
settle "${NODES[@]}" || fail "steady: not settled within ${DEADLINE}s (queued at A1 A2 B1 B2: $(counts "${NODES[@]}" | awk '{printf "%s ", $1}'))"
log "steady: settled after $((SECONDS - t0))s, $(pacs_files) files at the PACS"

declare -A RECV=()
for n in a1 a2; do RECV[$n]=$(metric "$n" received_objects_total listener=lan); done
for n in b1 b2; do RECV[$n]=$(metric "$n" received_objects_total listener=wan); done
ACK_A1=$(awk -F'\t' -v p="$P_A1" '$3 == p' "$WORK/steady/acked.tsv" | wc -l)
ACK_A2=$(awk -F'\t' -v p="$P_A2" '$3 == p' "$WORK/steady/acked.tsv" | wc -l)
C_B1=$(lb_stat 0 connections)
C_B2=$(lb_stat 1 connections)
log "steady: acknowledged by A1 $ACK_A1, by A2 $ACK_A2; received at A1 ${RECV[a1]:-?}, A2 ${RECV[a2]:-?}; stored at B1 ${RECV[b1]:-?}, B2 ${RECV[b2]:-?}; link connections to B1 $C_B1, to B2 $C_B2"
if ((ACK_A1 > 0 && ACK_A2 > 0)) && ((${RECV[a1]:-0} == ACK_A1 && ${RECV[a2]:-0} == ACK_A2)); then
	pass "steady, premise: both A replicas acknowledged objects (A1 $ACK_A1, A2 $ACK_A2), as their received_objects_total{listener=\"lan\"} say"
else
	fail "steady, premise: A1 acknowledged $ACK_A1 (metric ${RECV[a1]:-?}), A2 $ACK_A2 (metric ${RECV[a2]:-?}); both must have some, and agree"
fi
if ((${RECV[b1]:-0} > 0 && ${RECV[b2]:-0} > 0 && ${RECV[b1]:-0} + ${RECV[b2]:-0} == N_STEADY)); then
	pass "steady, premise: both B replicas stored objects (B1 ${RECV[b1]}, B2 ${RECV[b2]}), $N_STEADY together: each stored once at site B"
else
	fail "steady, premise: B1 stored ${RECV[b1]:-?}, B2 ${RECV[b2]:-?}; both must have some, $N_STEADY together"
fi
if ((C_B1 > 0 && C_B2 > 0)); then
	pass "steady, premise: the link Service spread connections over both backends (B1 $C_B1, B2 $C_B2)"
else
	fail "steady, premise: the link Service gave B1 $C_B1 and B2 $C_B2 connections; both must have some"
fi
"${TOOL[@]}" check "$WORK/gen-steady/study" "$WORK/steady/acked.tsv" "$WORK/pacs" --exactly-once >"$WORK/logs/check-steady.log" 2>&1 || true
report steady "$WORK/logs/check-steady.log"
log "steady: acked sent received lost corrupted duplicates = $COUNTS"
# Scenario 2 starts with an empty PACS folder (storescp writes by path: move the files).
mkdir -p "$WORK/pacs-steady"
find "$WORK/pacs" -type f -exec mv -t "$WORK/pacs-steady" {} +

# ------------------------------------------------------------ 2. B1 goes away
# The PACS is down while the study flows in, so that B1 holds objects it acknowledged and
# cannot deliver yet, and site B's backpressure (max_queue) leaves a queue at site A.
stop_bg "$SCP_PID" storescp 10 group || true
B1_BASE=$(metric b1 received_objects_total listener=wan)
B2_BASE=$(metric b2 received_objects_total listener=wan)
log "kill: PACS down; sending $N_KILL objects over A1 and A2; B1 is killed once it holds objects of them and site A has a queue"
t0=$SECONDS
start_bg "$WORK/logs/send-kill.log" "${TOOL[@]}" send "$WORK/kill" "$WORK/gen-kill/study" 127.0.0.1 "$P_A1" "$P_A2"
SENDER=$LAST_PID
killed=0
deadline=$((SECONDS + DEADLINE))
while ((SECONDS < deadline)) && alive "$SENDER"; do
	read -r q_b1 _ < <(counts b1)
	q_a=$(queued_sum a1 a2)
	if [[ $q_b1 != - && $q_a != x ]] && ((q_b1 >= 50 && q_a >= 20)); then
		b1_now=$(metric b1 received_objects_total listener=wan)
		acked_at_kill=$(wc -l <"$WORK/kill/acked.tsv" 2>/dev/null || echo 0)
		C_B2_KILL=$(lb_stat 1 connections)
		kill -KILL "${NODE_PID[b1]}"
		wait "${NODE_PID[b1]}" 2>/dev/null || true
		forget "${NODE_PID[b1]}"
		killed=1
		b2_at_kill=$(metric b2 received_objects_total listener=wan)
		break
	fi
	sleep 0.1
done
if ((killed)); then
	B1_STORED=$((b1_now - B1_BASE))
	pass "kill, premise: B1 SIGKILLed $((SECONDS - t0))s into the flow, holding $q_b1 acknowledged objects for the PACS (it stored $B1_STORED of this study), with $q_a queued at site A and $acked_at_kill of $N_KILL acknowledged by A"
else
	fail "kill, premise: B1 was not killed mid-flow (B1 queued ${q_b1:-?}, site A queued ${q_a:-?}, sender alive: $(alive "$SENDER" && echo yes || echo no))"
	exit 1
fi
start_storescp "$P_SCP" "$WORK/pacs" "$WORK/logs/storescp-2.log" --fork +uf || {
	fail "storescp did not come back"
	exit 1
}
log "kill: PACS back up"
deadline=$((SECONDS + DEADLINE))
while alive "$SENDER" && ((SECONDS < deadline)); do sleep 0.2; done
if alive "$SENDER"; then
	fail "kill: the sender did not finish within ${DEADLINE}s"
	exit 1
fi
wait "$SENDER" 2>/dev/null || fail "kill: the sender did not get every object acknowledged"
forget "$SENDER"
log "$(tail -n 1 "$WORK/logs/send-kill.log")"
# With B1 down, site A drains through B2.
if settle a1 a2 b2; then
	b2_now=$(metric b2 received_objects_total listener=wan)
	C_B2_AFTER=$(lb_stat 1 connections)
	log "kill: site A empty $((SECONDS - t0))s into the run, B1 still down; B2 stored $((b2_now - B2_BASE)) objects of this study ($((b2_now - b2_at_kill)) after the kill); link connections to B2: $C_B2_KILL at the kill, $C_B2_AFTER now; B1 refused $(lb_stat 0 refused)"
	if ((b2_now > b2_at_kill && C_B2_AFTER > C_B2_KILL)); then
		pass "kill: with B1 down, site A's retries landed on B2 through the link Service (a new connection, $((b2_now - b2_at_kill)) objects stored after the kill) and site A drained"
	else
		fail "kill: after the kill B2 stored $((b2_now - b2_at_kill)) objects and got $((C_B2_AFTER - C_B2_KILL)) new connections; the A replica on B1 did not move over"
	fi
else
	fail "kill: site A did not drain through B2 within ${DEADLINE}s (queued at A1 A2 B2: $(counts a1 a2 b2 | awk '{printf "%s ", $1}'))"
fi
before_restart=$(pacs_files)
start_node b1 -restart
wait_ready b1 || exit 1
settle "${NODES[@]}" || fail "kill: not settled within ${DEADLINE}s of B1's restart (queued at A1 A2 B1 B2: $(counts "${NODES[@]}" | awk '{printf "%s ", $1}'))"
B1_AFTER=$(metric b1 forwarded_objects_total destination=pacs)
log "kill: B1 restarted from its data directory and delivered ${B1_AFTER:-?} objects it had acknowledged ($before_restart files at the PACS before, $(pacs_files) after); settled $((SECONDS - t0))s into the run"
if ((${B1_AFTER:-0} >= q_b1)); then
	pass "kill: B1, restarted from its data directory, delivered what it held (${B1_AFTER:-0} objects; $q_b1 queued shortly before the kill)"
else
	fail "kill: B1 had $q_b1 queued shortly before the kill and delivered ${B1_AFTER:-0} after its restart"
fi
"${TOOL[@]}" check "$WORK/gen-kill/study" "$WORK/kill/acked.tsv" "$WORK/pacs" --max-dups "$MAX_DUPS" >"$WORK/logs/check-kill.log" 2>&1 || true
report kill "$WORK/logs/check-kill.log"
log "kill: acked sent received lost corrupted duplicates = $COUNTS"
read -r _ _ _ _ _ KILL_DUPS <<<"$COUNTS"

# ------------------------------------------------------------ end state, logs, self-test
mapfile -t END < <(counts "${NODES[@]}")
left=""
for i in "${!NODES[@]}"; do
	[[ ${END[$i]} == "0 0 0" ]] || left+=" ${NODES[$i]}: ${END[$i]};"
done
if [[ -z $left ]]; then
	pass "nothing left at any of the four nodes (0 queued, 0 in flight, 0 dead each)"
else
	fail "left over (queued in_flight dead):$left"
fi
bad_lines=$(grep -h "ERROR\|panicked" "$WORK"/logs/[ab][12]*.log | sed 's/\x1b\[[0-9;]*m//g' | head -8 || true)
if [[ -z $bad_lines ]]; then
	pass "no ERROR line or panic in the gateway logs"
else
	printf '%s\n' "$bad_lines" | cut -c1-400 | indent
	fail "ERROR lines or panics in the gateway logs"
fi
grep -h "WARN" "$WORK"/logs/[ab][12]*.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | sed 's/^[^ ]* *//' | sort | uniq -c | sort -rn | head -6 | indent || true
if "${TOOL[@]}" self-test >"$WORK/logs/self-test.log" 2>&1; then
	pass "self-test: the exactly-once check fails on a lost, a changed and a doubled object"
else
	indent <"$WORK/logs/self-test.log"
	fail "self-test of the checks"
fi
log "link Service: B1 $(lb_stat 0 connections) connections ($(lb_stat 0 refused) refused), B2 $(lb_stat 1 connections); duplicates after the kill: ${KILL_DUPS:-?}; $SECONDS s in all"
summary
((FAILED == 0))
