#!/usr/bin/env bash
# The durability check: an acknowledged object survives a power cut.
#
#   DICOM_GATEWAY_BIN=... bash tests/durability/power_cut.sh [a|b] [honest|lying] [OBJECTS]
#
# The chosen site keeps its data directory on lossyfs (lossyfs.py), a FUSE file system that
# loses, at a power cut, every byte that was written but not synced: exactly what a machine
# loses with its page cache. A kill -9 alone cannot show a missing fsync (the kernel keeps
# the written data); this can.
#
#   a: site B is down, so site A holds every object it acknowledged to pynetdicom;
#   b: storescp is down, so site B holds every object it confirmed to site A (A's queue is
#      empty before the cut: A has deleted its copies). Site B also fans every object out to
#      a hand-off folder (`archive`), so the cut hits objects with two destinations, one
#      delivered and one waiting: after it, each destination has each object exactly once.
#      The folder is on lossyfs too, which has no O_TMPFILE: the folder destination must use
#      its fallback (a hidden `.partial` file, fsynced, renamed into place), checked.
#
# Then: kill -9 the site, cut the power (premise checked: an unsynced canary file written just
# before is gone after), restart it, bring up what was down, and compare what reaches
# DCMTK's storescp with what was acknowledged: 0 lost, 0 corrupted, and (storescp was down
# until after the cut, so no delivery it confirmed can be repeated) 0 duplicates.
#
# `lying` is the sabotage run: lossyfs answers every fsync without syncing (a gateway that
# skips its sync, or a disk that lies about flushes). The check must then see acknowledged
# objects lost; the run passes only if it does. A check that passes a build that skips the
# sync is itself broken.
#
# Prints `power_cut(site X, MODE): N passed, M failed`.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../interop/lib.sh
source "$HERE/../interop/lib.sh"
LOG_TAG=power-cut
FAILED=0
BIN=${DICOM_GATEWAY_BIN:?set DICOM_GATEWAY_BIN to the dicom-gateway binary}
VICTIM=${1:-a}
MODE=${2:-honest}
OBJECTS=${3:-200}
[[ $VICTIM == a || $VICTIM == b ]] && [[ $MODE == honest || $MODE == lying ]] ||
	{ echo "usage: $0 [a|b] [honest|lying] [OBJECTS]" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dicomgw-power.XXXXXX")
cleanup() {
	stop_all_bg
	fusermount -u "$WORK/mnt" 2>/dev/null || umount -l "$WORK/mnt" 2>/dev/null || true
	if [[ -n ${KEEP_WORK:-} ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

ctl() { # command: hand it to lossyfs and print its report
	: >"$WORK/ctl/$1"
	local deadline=$((SECONDS + 30))
	until [[ -e $WORK/ctl/$1.done ]]; do
		((SECONDS < deadline)) || { fail "lossyfs did not answer $1"; exit 1; }
		sleep 0.05
	done
	cat "$WORK/ctl/$1.done"
	rm -f "$WORK/ctl/$1.done"
}
queued() { # site [destination]: objects queued there (empty if it does not answer)
	"$BIN" status --config "$WORK/site-$1.toml" --json 2>/dev/null |
		"$PY" -c 'import json,sys; print(sum(d["queued"] for d in json.load(sys.stdin)["destinations"] if len(sys.argv) < 2 or d["name"] == sys.argv[1]))' ${2:+"$2"} 2>/dev/null || true
}
ready() { # port: /readyz is 200
	[[ $(http_status "http://127.0.0.1:$1/readyz") == 200 ]]
}
wait_ready() { # site port pid timeout
	local deadline=$((SECONDS + $4))
	while ((SECONDS < deadline)) && alive "$3"; do
		ready "$2" && return 0
		sleep 0.2
	done
	return 1
}
start_site() { # site
	setsid "$BIN" serve --config "$WORK/site-$1.toml" >>"$WORK/site-$1.log" 2>&1 </dev/null &
	GW_PID[$1]=$!
	PIDS+=("${GW_PID[$1]}")
}
port_of() { [[ $1 == a ]] && echo "$P_A_HTTP" || echo "$P_B_HTTP"; }

read -r P_SCP P_A_DICOM P_A_HTTP P_B_HTTP P_B_LINK < <(free_ports 5)
init_keys "$WORK" "$WORK"
write_configs "$WORK"
mkdir -p "$WORK/backing" "$WORK/mnt"
sed -i "s|^data_dir = \"data-$VICTIM\"|data_dir = \"mnt/data-$VICTIM\"|" "$WORK/site-$VICTIM.toml"
grep -q "mnt/data-$VICTIM" "$WORK/site-$VICTIM.toml" || { fail "could not move the data directory"; exit 1; }
if [[ $VICTIM == b ]]; then
	sed -i 's|^route_to = \["pacs"\]|route_to = ["pacs", "archive"]|' "$WORK/site-b.toml"
	printf '\n[[destination]]\nname = "archive"\nkind = "folder"\npath = "mnt/archive"\n' >>"$WORK/site-b.toml"
	grep -q '"pacs", "archive"' "$WORK/site-b.toml" || { fail "could not add the fan-out"; exit 1; }
fi

start_bg "$WORK/lossyfs.log" "$PY" "$HERE/lossyfs.py" "$WORK/backing" "$WORK/mnt" "$WORK/ctl"
LOSSYFS=$LAST_PID
deadline=$((SECONDS + 20))
until grep -q "lossyfs: mounted" "$WORK/lossyfs.log" 2>/dev/null; do
	if ! alive "$LOSSYFS" || ((SECONDS > deadline)); then
		show_tail "$WORK/lossyfs.log"
		fail "lossyfs did not mount (needs root, /dev/fuse, libfuse2 and fusepy)"
		exit 1
	fi
	sleep 0.1
done

# Up: the victim, and site A in any case; site B only when it is the victim.
start_site "$VICTIM"
[[ $VICTIM == b ]] && start_site a
for s in a b; do
	[[ -n ${GW_PID[$s]} ]] || continue
	wait_ready "$s" "$(port_of "$s")" "${GW_PID[$s]}" 60 ||
		{ fail "site $s did not become ready"; show_tail "$WORK/site-$s.log"; exit 1; }
done
if [[ $MODE == lying ]]; then
	log "sabotage: lossyfs now acknowledges fsync without syncing: $(ctl lie)"
fi

log "sending $OBJECTS objects with pynetdicom; the power at site $VICTIM will be cut"
"$PY" "$HERE/../interop/crash_sender.py" 127.0.0.1 "$P_A_DICOM" GW_A "$OBJECTS" "$WORK" >"$WORK/sender.log" 2>&1 ||
	{ fail "the sender failed"; show_tail "$WORK/sender.log"; exit 1; }
acked=$(wc -l <"$WORK/acked.tsv")
((acked == OBJECTS)) || { fail "only $acked of $OBJECTS acknowledged"; exit 1; }

# The premise: the victim is the only holder of every acknowledged object.
deadline=$((SECONDS + 120))
if [[ $VICTIM == a ]]; then
	until [[ $(queued a) == "$OBJECTS" ]] || ((SECONDS > deadline)); do sleep 0.2; done
	[[ $(queued a) == "$OBJECTS" ]] || { fail "site A does not hold the $OBJECTS objects ($(queued a))"; exit 1; }
else
	until [[ $(queued a) == 0 && $(queued b pacs) == "$OBJECTS" ]] || ((SECONDS > deadline)); do sleep 0.2; done
	[[ $(queued a) == 0 && $(queued b pacs) == "$OBJECTS" ]] ||
		{ fail "site A still holds objects or B does not hold them all (A $(queued a), B $(queued b pacs))"; exit 1; }
fi
log "site $VICTIM alone holds all $OBJECTS acknowledged objects"

pid=${GW_PID[$VICTIM]}
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
forget "$pid"
# The canary: written, never synced. The cut must take it away, or it cut nothing.
printf 'canary' >"$WORK/mnt/canary"
report=$(ctl cut)
log "power cut at site $VICTIM: $report"
if [[ $VICTIM == b ]]; then
	renames=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["partial_renames"])' "$report")
	((renames >= OBJECTS)) ||
		fail "premise: the hand-off folder renamed $renames partial files into place, expected $OBJECTS (its O_TMPFILE fallback)"
fi
if [[ -s $WORK/mnt/canary ]]; then
	fail "premise: the power cut did not drop an unsynced write"
	exit 1
fi
[[ $MODE == lying ]] && log "lossyfs syncs again: $(ctl honest)"

echo "=== after the power cut" >>"$WORK/site-$VICTIM.log"
start_site "$VICTIM"
recovered=1
if ! wait_ready "$VICTIM" "$(port_of "$VICTIM")" "${GW_PID[$VICTIM]}" 60; then
	recovered=0
	log "site $VICTIM did not come back after the power cut"
	show_tail "$WORK/site-$VICTIM.log" 10
fi
start_storescp "$P_SCP" "$WORK/pacs" "$WORK/storescp.log"
if [[ $VICTIM == a ]] && ((recovered)); then
	start_site b
	wait_ready b "$P_B_HTTP" "${GW_PID[b]}" 60 || { fail "site B did not start"; exit 1; }
fi

# Deliveries: until both queues are empty, or nothing moves for 30 s.
deadline=$((SECONDS + 180))
last="" still=$SECONDS
while ((recovered)) && ((SECONDS < deadline)) && ((SECONDS - still < 30)); do
	now="$(queued a)/$(queued b)"
	[[ $now == 0/0 ]] && break
	[[ $now != "$last" ]] && { last=$now; still=$SECONDS; }
	sleep 0.5
done
stop_bg "$SCP_PID" storescp 10 group || true # storescp closes its last file

result=$("$PY" "$HERE/../interop/compare_acked.py" "$WORK")
read -r n_acked n_sent n_lost n_corrupt n_dups <<<"$result"
log "acknowledged $n_acked of $n_sent; lost $n_lost, corrupted $n_corrupt, identical duplicates $n_dups"
if [[ $VICTIM == b ]]; then
	result=$("$PY" "$HERE/../interop/compare_acked.py" "$WORK" "$WORK/mnt/archive")
	read -r _ _ f_lost f_corrupt f_dups <<<"$result"
	log "fan-out folder: lost $f_lost, corrupted $f_corrupt, duplicates $f_dups"
	n_lost=$((n_lost + f_lost))
	n_corrupt=$((n_corrupt + f_corrupt))
	if [[ $MODE == honest ]] && ((f_dups != 0)); then
		fail "the fan-out folder got $f_dups duplicates (files are named by object id: a re-delivery must find its file)"
	fi
fi
if [[ $MODE == honest ]]; then
	((recovered)) || fail "site $VICTIM did not recover from the power cut"
	((n_lost == 0)) || fail "$n_lost acknowledged objects were lost in the power cut"
	((n_corrupt == 0)) || fail "$n_corrupt corrupted objects reached the PACS"
	# The PACS (storescp) is down from the start until after the cut, so it confirmed no
	# delivery the crash could make the victim repeat: here even an identical duplicate
	# means an object was delivered twice without a crash in between (the crash loop,
	# where deliveries are cut mid-way, allows identical re-sends; this check cannot).
	((n_dups == 0)) || fail "the PACS got $n_dups duplicates, though it took nothing before the cut"
	checks=4
else
	if ((n_lost == 0)); then
		fail "the check passed although fsync was skipped: it cannot see a missing sync"
	else
		log "sabotage detected: without the sync, $n_lost acknowledged deliveries were lost (of $n_acked objects, over every destination checked)"
	fi
	checks=1
fi
echo "power_cut(site $VICTIM, $MODE): $((checks - FAILED)) passed, $FAILED failed"
((FAILED == 0))
