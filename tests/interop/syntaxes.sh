#!/usr/bin/env bash
# Every transfer syntax the gateway accepts, through both sites, byte for byte (issue 6, 1.6).
#
#   sender (DCMTK storescu | pynetdicom) --DICOM--> site A --TLS link--> site B --DICOM--> PACS
#
#   DICOM_GATEWAY_BIN=... bash tests/interop/syntaxes.sh
#
# The list is read from gateway/src/sop.rs at test time (TRANSFER_SYNTAXES and RETIRED_JPEG),
# so the test follows it. For each syntax, syntaxes_tool.py gen writes one Part 10 Secondary
# Capture object (unique UIDs, patient SYNTAXES^MARKER): the native syntaxes really encoded
# so (implicit LE, explicit LE, explicit BE, deflated), every other one an explicit VR LE
# data set with encapsulated Pixel Data (offset table + one fragment of arbitrary bytes),
# the JPIP ones with a Pixel Data Provider URL instead (.95 and .205 deflated). Plus
# negative controls: syntaxes that are not in the list.
#   1. Reference: every file straight to a pynetdicom SCP (syntaxes_tool.py scp, which takes
#      every listed syntax and the negative ones, and keeps each data set's raw bytes and the
#      negotiated syntax), once with DCMTK's storescu and once with pynetdicom, each file
#      on its own association proposing exactly the file's own syntax. A sender "handles" a
#      syntax if the SCP got the file's data set unchanged in that syntax. The sender used
#      through the gateways is storescu wherever it handles the syntax, pynetdicom elsewhere.
#   2. Through the gateways: each file into site A with its sender; site B's destination is
#      a second instance of the SCP (the PACS). Checks:
#      - every listed syntax had a sender (premise), and site A answered 0x0000 for each;
#      - site A accepted storescu's proposal of every listed syntax, also of those DCMTK
#        cannot encode (it proposes them, then fails on its own and aborts);
#      - each object arrived at the PACS exactly once, with the SHA-256 of its data set
#        (after the file meta) equal to the sent file's, in the file's own syntax;
#      - the negative controls were refused by site A (no accepted context, or a failure
#        status), from pynetdicom and from storescu, and never reached the PACS (which
#        would have taken them);
#      - a self-test: the same checks fail on doctored copies of the PACS's output;
#      - nothing left queued, in flight or dead at A or B; no ERROR line or panic in the logs.
# Prints `syntaxes: N passed, M failed`; exits non-zero on failure.
#
# Environment: SYNTAXES_SOP_RS (the sop.rs to read, default gateway/src/sop.rs of this
# checkout), SYNTAXES_MIN (fewest syntaxes the list may have, default 57), SYNTAXES_KEEP=1
# keeps the work directory (it is always kept on failure), SYNTAXES_DEADLINE (seconds to
# wait for delivery, default 60), PYTHON, DCMTK_BIN_DIR.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"
LOG_TAG=syntaxes
FAILED=0
PASSED=0
BIN=${DICOM_GATEWAY_BIN:?set DICOM_GATEWAY_BIN to the dicom-gateway binary}
[[ $BIN == /* ]] || BIN="$PWD/$BIN"
SOP_RS=${SYNTAXES_SOP_RS:-$(cd "$HERE/../.." && pwd)/gateway/src/sop.rs}
# The whole list today: 43 in TRANSFER_SYNTAXES and the 14 retired JPEG processes. (The
# standard has no further storage syntaxes; a parser that loses some fails here.)
MIN_SYNTAXES=${SYNTAXES_MIN:-57}
KEEP=${SYNTAXES_KEEP:-0}
DEADLINE=${SYNTAXES_DEADLINE:-60}
# Not in the list: a made-up UID under DICOM's root, and a private one.
NEGATIVE=(1.2.840.10008.1.2.4.999 1.3.6.1.4.1.99999.1)
TOOL=("$PY" "$HERE/syntaxes_tool.py")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dicomgw-syntaxes.XXXXXX")

checked_script "syntaxes"

need_peers_and_gateway || exit 1
mkdir -p "$WORK/logs"

# start_scp NAME PORT: a syntaxes_tool.py SCP (AE title NAME, output $WORK/NAME) taking
# every listed syntax and the negative ones; sets SCP_PID.
start_scp() {
	local extra=() u
	for u in "${NEGATIVE[@]}"; do extra+=(--extra "$u"); done
	start_bg "$WORK/logs/scp-$1.log" "${TOOL[@]}" scp "$2" "$WORK/$1" "$1" "$WORK/syntaxes.tsv" "${extra[@]}"
	SCP_PID=$LAST_PID
	wait_port "$2" "$SCP_PID" 20 || {
		show_tail "$WORK/logs/scp-$1.log"
		fail "the SCP $1 did not come up on port $2"
		exit 1
	}
}

# send_files SENDER PORT CALLED CALLING RESULTS LOGPREFIX N...: manifest files N... with
# SENDER, each on its own association proposing only its own syntax; appends
# "path<TAB>result<TAB>detail" lines to RESULTS.
send_files() {
	local sender=$1 port=$2 called=$3 calling=$4 results=$5 logp=$6 n
	shift 6
	(($# > 0)) || return 0
	case $sender in
	dcmtk)
		for n in "$@"; do
			# -xf: profile Fn proposes file n's SOP class with file n's syntax only.
			"$STORESCU" -d -to 30 -ta 30 -td 30 -aet "$calling" -aec "$called" \
				-xf "$WORK/in/storescu.cfg" "F$n" 127.0.0.1 "$port" "${FILE[$n]}" >"$logp$n.log" 2>&1 || true
		done
		"${TOOL[@]}" dcmtk-results "$WORK/in/manifest.tsv" "$logp" "$results.dcmtk"
		cat "$results.dcmtk" >>"$results"
		rm -f "$results.dcmtk"
		;;
	pynetdicom)
		local paths=()
		for n in "$@"; do paths+=("${FILE[$n]}"); done
		"${TOOL[@]}" send 127.0.0.1 "$port" "$called" "$calling" "$results" "${paths[@]}" >"${logp}all.log" 2>&1 || {
			show_tail "${logp}all.log"
			fail "pynetdicom sender crashed"
		}
		;;
	esac
}

# ------------------------------------------------------------ the list and the inputs
if ! "${TOOL[@]}" parse "$SOP_RS" >"$WORK/syntaxes.tsv" 2>"$WORK/logs/parse.log"; then
	show_tail "$WORK/logs/parse.log"
	fail "cannot read the transfer syntaxes from $SOP_RS"
	exit 1
fi
N_LISTED=$(wc -l <"$WORK/syntaxes.tsv")
N_TS=$(awk -F'\t' '$3 == "TRANSFER_SYNTAXES"' "$WORK/syntaxes.tsv" | wc -l)
N_RETIRED=$(awk -F'\t' '$3 == "RETIRED_JPEG"' "$WORK/syntaxes.tsv" | wc -l)
if ((N_LISTED >= MIN_SYNTAXES)); then
	pass "found $N_LISTED transfer syntaxes in $(basename "$SOP_RS") ($N_TS in TRANSFER_SYNTAXES, $N_RETIRED in RETIRED_JPEG; at least $MIN_SYNTAXES expected)"
else
	fail "found only $N_LISTED transfer syntaxes in $SOP_RS ($N_TS in TRANSFER_SYNTAXES, $N_RETIRED in RETIRED_JPEG), expected at least $MIN_SYNTAXES"
	exit 1
fi

neg_args=()
for u in "${NEGATIVE[@]}"; do neg_args+=(--negative "$u"); done
"${TOOL[@]}" gen "$WORK/in" "$WORK/syntaxes.tsv" "${neg_args[@]}" >"$WORK/logs/gen.log" 2>&1 || {
	show_tail "$WORK/logs/gen.log"
	fail "generating the inputs failed"
	exit 1
}
log "$(tail -n 1 "$WORK/logs/gen.log")"
declare -A FILE=()
ALL=()
while IFS=$'\t' read -r n path _; do
	FILE[$n]=$path
	ALL+=("$n")
done <"$WORK/in/manifest.tsv"
# Which of the files DCMTK can read at all (information).
unreadable=()
for n in "${ALL[@]}"; do
	"$DCMTK_BIN_DIR/dcmdump" -q "${FILE[$n]}" >/dev/null 2>&1 || unreadable+=("$(awk -F'\t' -v n="$n" '$1 == n {print $3}' "$WORK/in/manifest.tsv")")
done
log "dcmdump cannot read ${#unreadable[@]} of ${#ALL[@]} files: ${unreadable[*]:-none}"

# ------------------------------------------------------------ 1. reference: straight to an SCP
read -r P_REF < <(free_ports 1)
start_scp REF "$P_REF"
t0=$SECONDS
send_files dcmtk "$P_REF" REF SYN_DCMTK "$WORK/ref-dcmtk.tsv" "$WORK/logs/ref-dcmtk-" "${ALL[@]}"
send_files pynetdicom "$P_REF" REF SYN_PY "$WORK/ref-py.tsv" "$WORK/logs/ref-py-" "${ALL[@]}"
stop_bg "$SCP_PID" "SCP REF" 10 || true
log "direct sends done in $((SECONDS - t0))s"
"${TOOL[@]}" pick "$WORK/in/manifest.tsv" "$WORK/REF" "$WORK/ref-dcmtk.tsv" "$WORK/ref-py.tsv" \
	"$WORK/senders.tsv" >"$WORK/logs/pick.log" 2>&1 || {
	show_tail "$WORK/logs/pick.log"
	fail "choosing the senders failed"
	exit 1
}
log "direct reference (n, syntax, kind, sender used, what each sender did directly):"
indent <"$WORK/logs/pick.log"
N_DCMTK=$(awk -F'\t' '$3 == "listed" && $4 == "dcmtk"' "$WORK/senders.tsv" | wc -l)
N_PY=$(awk -F'\t' '$3 == "listed" && $4 == "pynetdicom"' "$WORK/senders.tsv" | wc -l)
N_NONE=$(awk -F'\t' '$3 == "listed" && $4 == "none"' "$WORK/senders.tsv" | wc -l)
N_PY_OK=$(awk -F'\t' '$3 == "listed" && $6 == "ok"' "$WORK/senders.tsv" | wc -l)
NOT_DCMTK=$(awk -F'\t' '$3 == "listed" && $5 != "ok" {printf "%s%s", sep, $2; sep = " "}' "$WORK/senders.tsv")
log "senders: storescu for $N_DCMTK of $N_LISTED listed syntaxes, pynetdicom for $N_PY, none for $N_NONE (pynetdicom alone handles $N_PY_OK)"
log "DCMTK's storescu $("$STORESCU" --version | awk 'NR == 1 {print $3}') cannot send: ${NOT_DCMTK:-none}"
# ... and why (its first error, the syntax's UID left out)
awk -F'\t' '$3 == "listed" && $5 != "ok" {sub(/^error \(E: /, "", $5); sub(/: [0-9.]+\)$/, "", $5); sub(/\(.*/, "", $5); print $5}' \
	"$WORK/senders.tsv" | sort | uniq -c | sed 's/^ *\([0-9]*\) /\1 x /' | indent
awk -F'\t' '$3 == "negative" {print "negative control " $2 ": sent by " $4 " (dcmtk: " $5 "; pynetdicom: " $6 ")"}' "$WORK/senders.tsv" | indent

# ------------------------------------------------------------ 2. through the gateways to the PACS
read -r P_SCP P_A_DICOM P_A_HTTP P_B_HTTP P_B_LINK < <(free_ports 5)
init_keys "$WORK" "$WORK/logs" || {
	show_tail "$WORK/logs/pki.log"
	show_tail "$WORK/logs/kek.log"
	fail "key setup failed"
	exit 1
}
write_configs "$WORK"
# site-b's `pacs` destination is the PACS SCP.
sed -i 's/^ae_title = "STORESCP"$/ae_title = "PACS"/' "$WORK/site-b.toml"
grep -q '^ae_title = "PACS"$' "$WORK/site-b.toml" || {
	fail "could not point site-b at the PACS"
	exit 1
}
start_scp PACS "$P_SCP"
start_sites "$WORK" "$WORK/logs/"
wait_sites_ready 60 0.2 || {
	show_tail "$WORK/logs/site-a.log"
	show_tail "$WORK/logs/site-b.log"
	fail "the sites did not become ready (A $READY_A, B $READY_B)"
	exit 1
}
log "site-a :$P_A_DICOM -> site-b :$P_B_LINK -> PACS :$P_SCP ready"

t0=$SECONDS
mapfile -t VIA_DCMTK < <(awk -F'\t' '$4 == "dcmtk" {print $1}' "$WORK/senders.tsv")
mapfile -t VIA_PY < <(awk -F'\t' '$4 == "pynetdicom" {print $1}' "$WORK/senders.tsv")
send_files dcmtk "$P_A_DICOM" GW_A SYN_DCMTK "$WORK/gw.tsv" "$WORK/logs/gw-dcmtk-" "${VIA_DCMTK[@]}"
send_files pynetdicom "$P_A_DICOM" GW_A SYN_PY "$WORK/gw.tsv" "$WORK/logs/gw-py-" "${VIA_PY[@]}"
# storescu proposing what it cannot send (it fails encoding the data set and aborts): site A
# must accept each listed syntax, and refuse the negative controls.
mapfile -t PROPOSE_N < <(awk -F'\t' '$4 != "dcmtk" {print $1}' "$WORK/senders.tsv")
: >"$WORK/gw-propose-dcmtk.tsv"
send_files dcmtk "$P_A_DICOM" GW_A SYN_DCMTK "$WORK/gw-propose-dcmtk.tsv" "$WORK/logs/gw-propose-dcmtk-" "${PROPOSE_N[@]}"
log "sent ${#VIA_DCMTK[@]} files with storescu and ${#VIA_PY[@]} with pynetdicom (negative controls included) into site A, and storescu proposed ${#PROPOSE_N[@]} more, in $((SECONDS - t0))s: $(cut -f2 "$WORK/gw.tsv" | sort | uniq -c | awk '{c = $1; $1 = ""; printf "%s%s x%d", sep, substr($0, 2), c; sep = ", "}')"

gw_counts() { # site: "queued in_flight dead delivered" of its one destination, or empty
	local dest=pacs
	[[ $1 == a ]] && dest=site-b
	if "$BIN" status --config "$WORK/site-$1.toml" --json >"$WORK/status-$1.json" 2>/dev/null; then
		"${TOOL[@]}" gw "$WORK/status-$1.json" "$dest" 2>/dev/null || true
	fi
}
# Until every object site A acknowledged is at the PACS and nothing waits at A or B.
acked=$(awk -F'\t' '$2 == "stored"' "$WORK/gw.tsv" | wc -l)
deadline=$((SECONDS + DEADLINE))
settled=0
while ((SECONDS < deadline)); do
	have=0
	[[ -f $WORK/PACS/received.tsv ]] && have=$(wc -l <"$WORK/PACS/received.tsv")
	read -r qa fa da _ <<<"$(gw_counts a)"
	read -r qb fb db _ <<<"$(gw_counts b)"
	if ((have >= acked)) && [[ ${qa:-x}${fa:-x}${qb:-x}${fb:-x} == 0000 ]]; then
		settled=1
		break
	fi
	sleep 0.5
done
sleep 2 # late duplicates
read -r qa fa da _ <<<"$(gw_counts a)"
read -r qb fb db _ <<<"$(gw_counts b)"
have=$({ cat "$WORK/PACS/received.tsv" 2>/dev/null || true; } | wc -l)
log "$have objects at the PACS ($acked acknowledged by site A) after $((SECONDS - t0))s$( ((settled)) || echo ", NOT settled within ${DEADLINE}s")"
stop_bg "${GW_PID[a]}" site-a 30 || true
stop_bg "${GW_PID[b]}" site-b 30 || true
stop_bg "$SCP_PID" "SCP PACS" 10 || true

# ------------------------------------------------------------ the checks
CHECK=("$WORK/in/manifest.tsv" "$WORK/senders.tsv" "$WORK/gw.tsv" "$WORK/PACS" "$WORK/gw-propose-dcmtk.tsv")
"${TOOL[@]}" check "${CHECK[@]}" >"$WORK/logs/check.log" 2>&1 || true
while IFS=$'\t' read -r verdict text; do
	case $verdict in
	PASS) pass "$text" ;;
	FAIL) fail "$text" ;;
	DETAIL) printf '%s\n' "$text" | indent ;;
	*) printf '%s\t%s\n' "$verdict" "$text" | indent ;;
	esac
done <"$WORK/logs/check.log"
grep -q '^PASS' "$WORK/logs/check.log" || fail "the checks did not run (log $WORK/logs/check.log)"

if "${TOOL[@]}" self-test "${CHECK[@]}" >"$WORK/logs/self-test.log" 2>&1; then
	indent <"$WORK/logs/self-test.log"
	pass "self-test: the checks fail on a changed byte, a re-deflated data set, a missing or doubled object, another syntax, a failure status, a leaked negative control"
else
	indent <"$WORK/logs/self-test.log"
	fail "self-test of the checks"
fi

if [[ ${qa:-x} == 0 && ${fa:-x} == 0 && ${da:-x} == 0 && ${qb:-x} == 0 && ${fb:-x} == 0 && ${db:-x} == 0 ]]; then
	pass "nothing left at either site (site A: 0 queued, 0 in flight, 0 dead; site B: the same)"
else
	fail "left over: site A ${qa:-?} queued, ${fa:-?} in flight, ${da:-?} dead; site B ${qb:-?} queued, ${fb:-?} in flight, ${db:-?} dead"
	"$BIN" queue list --config "$WORK/site-b.toml" --dead --json 2>/dev/null | head -c 3000 | indent || true
fi

bad_lines=$(grep -h "ERROR\|panicked" "$WORK"/logs/site-?.log | sed 's/\x1b\[[0-9;]*m//g' | head -8 || true)
if [[ -z $bad_lines ]]; then
	pass "no ERROR line or panic in the gateway logs"
else
	printf '%s\n' "$bad_lines" | cut -c1-400 | indent
	fail "ERROR lines or panics in the gateway logs"
fi
grep -h "WARN" "$WORK"/logs/site-?.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-240 | sort | uniq -c | sort -rn | head -6 | indent || true

log "senders through the gateways: storescu $N_DCMTK, pynetdicom $N_PY (of $N_LISTED listed syntaxes); negative controls ${#NEGATIVE[@]}"
summary
((FAILED == 0))
