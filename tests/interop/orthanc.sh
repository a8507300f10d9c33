#!/usr/bin/env bash
# A real PACS that says no: Orthanc (Debian's `orthanc` package) as site B's PACS.
#
#   DICOM_GATEWAY_BIN=... bash tests/interop/orthanc.sh
#
# Inputs: pydicom's corpus (the *.dcm files of its test_files folder that are Part 10 and
# that pynetdicom can send) and 100 generated CT objects (orthanc_tool.py prep).
#   1. Reference: every file straight to a fresh Orthanc #1, each on its own association
#      (so that an abort costs that file only); the verdicts and the SOP Instance UIDs that
#      Orthanc's REST API then lists are recorded. Premises: Orthanc refused some files
#      with a status, and aborted (or stopped answering) on at least one.
#   2. Through the gateways: pynetdicom -> site A -> link -> site B -> Orthanc #2, the
#      corpus first, then the CT objects (so that the refused objects are queued at B
#      ahead of the 100 CT objects). Site B's destination gets a small retry budget.
#      Checks:
#      - every instance Orthanc #1 stored arrives in Orthanc #2 (same UID sets);
#      - the files Orthanc refused end as dead letters at site B (same UIDs, with the
#        PACS's reason, attempts within the budget), and nothing stays queued at A or B;
#      - the good objects were not held back by the refused ones: the objects Orthanc
#        aborts on were queued ahead of the CT objects and still being retried when the
#        sender was done (premise), and every accepted instance must have arrived while
#        they still had attempts left (each of their attempts holds an association until
#        Orthanc's DicomScpTimeout; a good object takes milliseconds);
#      - no ERROR line or panic in the gateway logs.
#   The seconds measured (direct send, arrival through the gateways, last dead letter) are
#   printed as information, never asserted.
# Prints `orthanc: N passed, M failed`; exits non-zero on failure.
#
# Environment: ORTHANC_BIN (default /usr/sbin/Orthanc), ORTHANC_ASSOCIATIONS (site B's
# `associations` towards Orthanc, default 1 as the gateway's), ORTHANC_KEEP=1 keeps the work
# directory (it is always kept on failure), ORTHANC_DEADLINE (seconds to wait for the
# gateway run to settle before giving up, default 300), PYTHON, DCMTK_BIN_DIR.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
LOG_TAG=orthanc
FAILED=0
PASSED=0
BIN=${DICOM_GATEWAY_BIN:?set DICOM_GATEWAY_BIN to the dicom-gateway binary}
[[ $BIN == /* ]] || BIN="$PWD/$BIN"
ORTHANC=${ORTHANC_BIN:-/usr/sbin/Orthanc}
KEEP=${ORTHANC_KEEP:-0}
DEADLINE=${ORTHANC_DEADLINE:-300}
ASSOCIATIONS=${ORTHANC_ASSOCIATIONS:-1}
TOOL=("$PY" "$HERE/orthanc_tool.py")
# Site B's retry budget, and Orthanc's DicomScpTimeout (how long it waits for a PDU before
# aborting the association; its default is 30 s).
MAX_ATTEMPTS=4
SCP_TIMEOUT=5
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dicomgw-orthanc.XXXXXX")

checked_script "orthanc"

[[ -x $ORTHANC ]] || { fail "$ORTHANC not found (apt-get install orthanc)"; exit 1; }
[[ -x $BIN ]] || { fail "gateway binary $BIN not found"; exit 1; }

now() { printf '%s' "$EPOCHREALTIME"; }
secs() { "$PY" -c 'import sys; print("%.1f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$1" "$2"; }

# start_orthanc NAME DICOM_PORT HTTP_PORT: an Orthanc of its own in $WORK/NAME; sets ORTHANC_PID.
start_orthanc() {
	local name=$1 dport=$2 hport=$3 deadline=$((SECONDS + 60)) st=000
	"${TOOL[@]}" config "$WORK/$name" "$dport" "$hport" ORTHANC "$SCP_TIMEOUT"
	start_bg "$WORK/$name.log" "$ORTHANC" --verbose "$WORK/$name/orthanc.json"
	ORTHANC_PID=$LAST_PID
	while ((SECONDS < deadline)) && alive "$ORTHANC_PID"; do
		st=$(http_status "http://127.0.0.1:$hport/system")
		[[ $st == 200 ]] && wait_port "$dport" "$ORTHANC_PID" 20 && return 0
		sleep 0.2
	done
	show_tail "$WORK/$name.log"
	fail "Orthanc $name did not come up (REST $st)"
	exit 1
}

# ------------------------------------------------------------ inputs
"${TOOL[@]}" prep "$WORK/in" --count 100 >"$WORK/prep.log" 2>&1 || {
	show_tail "$WORK/prep.log"
	fail "preparing the inputs failed"
	exit 1
}
log "$(tail -n 1 "$WORK/prep.log")"
grep '^skipped ' "$WORK/prep.log" | indent
awk -F'\t' '$3 == "corpus" {print $1}' "$WORK/in/manifest.tsv" >"$WORK/in/corpus.txt"
awk -F'\t' '$3 == "generated" {print $1}' "$WORK/in/manifest.tsv" >"$WORK/in/generated.txt"
N_FILES=$(wc -l <"$WORK/in/files.txt")

# ------------------------------------------------------------ 1. reference: straight to Orthanc #1
read -r P_O1_DICOM P_O1_HTTP < <(free_ports 2)
start_orthanc orthanc1 "$P_O1_DICOM" "$P_O1_HTTP"
O1_PID=$ORTHANC_PID
t0=$(now)
"${TOOL[@]}" direct "$P_O1_DICOM" ORTHANC "$WORK/direct.tsv" "$WORK/in/corpus.txt" "$WORK/in/generated.txt" >"$WORK/direct.log" 2>&1 || {
	show_tail "$WORK/direct.log"
	fail "the direct send failed"
	exit 1
}
t1=$(now)
DIRECT_SECS=$(secs "$t0" "$t1")
"${TOOL[@]}" uids "$P_O1_HTTP" >"$WORK/o1.uids"
stop_bg "$O1_PID" "Orthanc #1"
log "direct to Orthanc #1 in ${DIRECT_SECS}s: $(tail -n 1 "$WORK/direct.log" | sed 's/^direct: //')"
awk -F'\t' '$3 != "stored"' "$WORK/direct.tsv" | sed 's#^.*/##' | awk -F'\t' '{print $1 ": " $3}' | indent
awk -F'\t' '$3 == "stored" {print $2}' "$WORK/direct.tsv" | sort -u >"$WORK/stored.uids"
awk -F'\t' '$3 != "stored" {print $2}' "$WORK/direct.tsv" | sort >"$WORK/refused.uids"
awk -F'\t' '$3 == "aborted" || $3 == "no response" {print $2}' "$WORK/direct.tsv" | sort -u >"$WORK/aborted.uids"
N_ACCEPTED=$(wc -l <"$WORK/o1.uids")
N_REFUSED=$(wc -l <"$WORK/refused.uids")
N_STATUS=$(awk -F'\t' '$3 ~ /^status /' "$WORK/direct.tsv" | wc -l)
N_ABORT=$(wc -l <"$WORK/aborted.uids")
N_GEN_OK=$(awk -F'\t' 'NR == FNR {if ($3 == "generated") g[$1] = 1; next} ($1 in g) && $3 == "stored"' \
	"$WORK/in/manifest.tsv" "$WORK/direct.tsv" | wc -l)
# Premises: the run means something only if Orthanc said no, in both ways, and yes to the rest.
if ((N_STATUS > 0 && N_ABORT > 0 && N_GEN_OK == 100 && N_ACCEPTED > 100)) &&
	! cut -f3 "$WORK/direct.tsv" | grep -Evq '^(stored|status 0x[0-9A-F]{4}|aborted|no response)$'; then
	pass "premise: Orthanc #1 refused $N_STATUS files with a status and aborted on $N_ABORT, stored all 100 CT objects ($N_ACCEPTED instances in all)"
else
	fail "premise: expected refusals by status and by abort, and all 100 CT objects stored (status $N_STATUS, abort $N_ABORT, CT stored $N_GEN_OK, instances $N_ACCEPTED)"
fi
if cmp -s "$WORK/o1.uids" "$WORK/stored.uids"; then
	pass "Orthanc #1's REST API lists exactly the $N_ACCEPTED instances it answered Success for"
else
	fail "Orthanc #1's REST API and its C-STORE answers disagree"
	diff "$WORK/stored.uids" "$WORK/o1.uids" | head -5 | indent
fi
if grep -q 'required tags' "$WORK/orthanc1.log"; then
	log "Orthanc #1 said: $(grep -m1 -o 'Store has failed because required tags.*are missing' "$WORK/orthanc1.log")"
fi
N_ABORT_LOG=$(grep -c 'aborting association' "$WORK/orthanc1.log" || true)
if ((N_ABORT_LOG == N_ABORT)); then
	pass "premise: Orthanc #1 logged $N_ABORT_LOG aborted associations, one per file without a response"
	grep -h -o 'E: DcmElement.*premature end of stream' "$WORK/orthanc1.log" | sed 's/^/Orthanc #1 said: /' | indent
	log "Orthanc #1 said: $(grep -m1 -o 'DIMSE failure (aborting association.*' "$WORK/orthanc1.log")"
else
	fail "premise: Orthanc #1 logged $N_ABORT_LOG aborted associations, expected $N_ABORT"
fi

# ------------------------------------------------------------ 2. through the gateways to Orthanc #2
read -r P_SCP P_O2_HTTP P_A_DICOM P_A_HTTP P_B_HTTP P_B_LINK < <(free_ports 6)
init_keys "$WORK" "$WORK" || { fail "key setup failed"; show_tail "$WORK/pki.log"; exit 1; }
write_configs "$WORK"
# site-b's `pacs` destination (the last table of site-b.toml) is Orthanc #2, with a small budget.
sed -i 's/^ae_title = "STORESCP"$/ae_title = "ORTHANC"/' "$WORK/site-b.toml"
grep -q '^ae_title = "ORTHANC"$' "$WORK/site-b.toml" || { fail "could not point site-b at Orthanc"; exit 1; }
cat >>"$WORK/site-b.toml" <<EOF
associations = $ASSOCIATIONS

[destination.retry]
initial = "1s"
max_delay = "4s"
max_attempts = $MAX_ATTEMPTS
EOF
start_orthanc orthanc2 "$P_SCP" "$P_O2_HTTP"
start_sites "$WORK" "$WORK/"
wait_sites_ready 60 0.2 || {
	show_tail "$WORK/site-a.log"
	show_tail "$WORK/site-b.log"
	fail "the sites did not become ready (A $READY_A, B $READY_B)"
	exit 1
}

gw_counts() { # site: "queued in_flight dead delivered" of its one destination, or empty
	local dest=pacs
	[[ $1 == a ]] && dest=site-b
	"$BIN" status --config "$WORK/site-$1.toml" --json >"$WORK/status-$1.json" 2>/dev/null &&
		"${TOOL[@]}" gw "$WORK/status-$1.json" "$dest" 2>/dev/null || true
}

# The corpus (every refused file is in it) first, then the 100 CT objects.
log "sending $N_FILES files into site A: $(wc -l <"$WORK/in/corpus.txt") corpus files, then 100 CT objects"
t0=$(now)
send_rc=0
"$PY" "$HERE/send_pynetdicom.py" 127.0.0.1 "$P_A_DICOM" --called-ae GW_A --calling-ae SENDER \
	--file-list "$WORK/in/corpus.txt" >"$WORK/send-corpus.log" 2>&1 || send_rc=1
"$PY" "$HERE/send_pynetdicom.py" 127.0.0.1 "$P_A_DICOM" --called-ae GW_A --calling-ae SENDER \
	--file-list "$WORK/in/generated.txt" >"$WORK/send-generated.log" 2>&1 || send_rc=1
t_sent=$(now)
# The premise of "not held back": the 100 CT objects, sent last, queued at B behind the
# objects Orthanc aborts on, while these were still being retried.
"$BIN" queue list --config "$WORK/site-b.toml" --json >"$WORK/queue-at-sent.json" 2>/dev/null || echo '[]' >"$WORK/queue-at-sent.json"
read -r alive_at_sent _ <<<"$("${TOOL[@]}" alive "$WORK/queue-at-sent.json" "$WORK/aborted.uids")"
grep -h 'FAILED' "$WORK"/send-*.log | sed 's#FAILED /.*/#FAILED #' | indent || true
if ((send_rc == 0)); then
	pass "site A acknowledged all $N_FILES files ($(secs "$t0" "$t_sent")s)"
else
	fail "site A did not acknowledge every file: $(tail -qn 1 "$WORK"/send-*.log | tr '\n' ' ')"
fi

# Watch Orthanc #2 and site B until every accepted instance has arrived and nothing is
# waiting at either site any more (or the deadline passes).
t_arrived="" dead_at_arrival="" attempts_at_arrival="" alive_at_arrival="" t_settled=""
deadline=$((SECONDS + DEADLINE))
while ((SECONDS < deadline)); do
	"${TOOL[@]}" uids "$P_O2_HTTP" >"$WORK/o2.uids" 2>/dev/null || true
	if [[ -z $t_arrived ]] && [[ -z $(comm -23 "$WORK/o1.uids" "$WORK/o2.uids") ]]; then
		t_arrived=$(now)
		# Read after the arrival: at most what it was when the last one arrived.
		read -r _ _ dead_at_arrival _ <<<"$(gw_counts b)"
		"$BIN" queue list --config "$WORK/site-b.toml" --json >"$WORK/queue-at-arrival.json" 2>/dev/null || echo '[]' >"$WORK/queue-at-arrival.json"
		read -r alive_at_arrival _ <<<"$("${TOOL[@]}" alive "$WORK/queue-at-arrival.json" "$WORK/aborted.uids")"
		attempts_at_arrival=$("$PY" -c 'import json,sys; print(" ".join("%s:%d" % (e["state"], e["attempts"]) for e in json.load(open(sys.argv[1]))))' \
			"$WORK/queue-at-arrival.json" 2>/dev/null || echo "?")
		log "all $N_ACCEPTED accepted instances are in Orthanc #2, $(secs "$t0" "$t_arrived")s after the first send; dead letters at site B then: ${dead_at_arrival:-?} of $N_REFUSED; site B's entries then (state:attempts): $attempts_at_arrival"
	fi
	read -r qa _ da _ <<<"$(gw_counts a)"
	read -r qb _ db _ <<<"$(gw_counts b)"
	if [[ -n $t_arrived && ${qa:-x} == 0 && ${qb:-x} == 0 ]]; then
		t_settled=$(now)
		break
	fi
	sleep 0.5
done
[[ -n $t_settled ]] || log "not settled after ${DEADLINE}s: queued at A ${qa:-?}, at B ${qb:-?}, dead at B ${db:-?}"

# Every accepted instance arrived, and only those.
"${TOOL[@]}" uids "$P_O2_HTTP" >"$WORK/o2.uids"
if cmp -s "$WORK/o1.uids" "$WORK/o2.uids"; then
	pass "Orthanc #2 holds the same $N_ACCEPTED SOP Instance UIDs that Orthanc #1 stored directly"
else
	fail "Orthanc #2's instances differ from Orthanc #1's: $(comm -23 "$WORK/o1.uids" "$WORK/o2.uids" | wc -l) missing, $(comm -13 "$WORK/o1.uids" "$WORK/o2.uids" | wc -l) extra"
	comm -3 "$WORK/o1.uids" "$WORK/o2.uids" | head -5 | indent
fi

# The refused ones are dead letters at B, with Orthanc's reason, within the budget.
"$BIN" queue list --config "$WORK/site-b.toml" --dead --json >"$WORK/dead.json" 2>"$WORK/dead.err" || true
"${TOOL[@]}" dead "$WORK/dead.json" >"$WORK/dead.tsv" 2>>"$WORK/dead.err" || true
cut -f1 "$WORK/dead.tsv" | sort >"$WORK/dead.uids"
log "dead letters at site B (SOP Instance UID, attempts, last reason):"
indent <"$WORK/dead.tsv"
if cmp -s "$WORK/refused.uids" "$WORK/dead.uids"; then
	pass "the $N_REFUSED files Orthanc refused directly are the $N_REFUSED dead letters at site B"
else
	fail "dead letters at site B ($(wc -l <"$WORK/dead.uids")) are not the files Orthanc refused ($N_REFUSED)"
	diff "$WORK/refused.uids" "$WORK/dead.uids" | head -5 | indent
	show_tail "$WORK/dead.err" 5
fi
# Each with what Orthanc said directly (its status, or the abort) and within the budget.
if [[ -s $WORK/dead.tsv ]] && awk -F'\t' -v max="$MAX_ATTEMPTS" '
	NR == FNR { if ($3 != "stored") want[$2] = ($3 ~ /^status / ? substr($3, 8) : "abort"); next }
	!($1 in want) || index($3, want[$1]) == 0 || $2 < 1 || $2 > max { print "    | unexpected: " $0; bad = 1 }
	END { exit bad }' "$WORK/direct.tsv" "$WORK/dead.tsv"; then
	pass "every dead letter carries Orthanc's verdict (its status or the abort) and took at most $MAX_ATTEMPTS attempts"
else
	fail "dead letters whose reason is not Orthanc's verdict, or beyond the budget of $MAX_ATTEMPTS attempts"
fi
if [[ ${qa:-x} == 0 && ${qb:-x} == 0 && ${da:-x} == 0 && ${db:-x} == "$N_REFUSED" ]]; then
	pass "nothing is left queued (site A: 0 queued, 0 dead; site B: 0 queued, $db dead)"
else
	fail "left over: site A ${qa:-?} queued, ${da:-?} dead; site B ${qb:-?} queued, ${db:-?} dead (expected $N_REFUSED)"
fi

# Not held back: the objects Orthanc aborts on were queued at B ahead of the 100 CT objects
# and still had attempts left when the sender was done (premise); every accepted instance
# must then have arrived while they still had attempts left. Each of their attempts holds
# the association until Orthanc gives up (DicomScpTimeout); a good object takes
# milliseconds. If the good objects had to wait for them, they are dead letters by then.
if [[ ${alive_at_sent:-0} != "$N_ABORT" ]]; then
	fail "premise: when the sender was done, ${alive_at_sent:-0} of the $N_ABORT objects Orthanc aborts on were still being retried at site B"
elif [[ -n $t_arrived && ${alive_at_arrival:-0} == "$N_ABORT" ]]; then
	pass "not held back: every accepted instance had arrived while the $N_ABORT objects Orthanc aborts on (queued ahead of the CT objects) still had attempts left ($dead_at_arrival of $N_REFUSED refused objects dead then)"
else
	fail "held back: when the last accepted instance arrived, only ${alive_at_arrival:-?} of the $N_ABORT objects Orthanc aborts on were still retrying, the rest had already spent their $MAX_ATTEMPTS attempts (the good objects behind them waited for that budget)"
fi

# Clean logs: no ERROR line, no panic.
bad_lines=$(grep -h "ERROR\|panicked" "$WORK"/site-?.log | sed 's/\x1b\[[0-9;]*m//g' | head -5 || true)
if [[ -z $bad_lines ]]; then
	pass "no ERROR line or panic in the gateway logs"
else
	printf '%s\n' "$bad_lines" | indent
	fail "ERROR lines or panics in the gateway logs"
fi
grep -h "WARN" "$WORK"/site-b.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 | sort | uniq -c | sort -rn | head -8 | indent || true

log "timings (information only): direct to Orthanc ${DIRECT_SECS}s; through the gateways: acknowledged by A after $(secs "$t0" "$t_sent")s, every accepted instance in Orthanc #2 after ${t_arrived:+$(secs "$t0" "$t_arrived")}s, settled (every refused one dead) after ${t_settled:+$(secs "$t0" "$t_settled")}s"
summary
((FAILED == 0))
