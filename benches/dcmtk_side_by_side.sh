#!/usr/bin/env bash
# Side-by-side throughput and memory: DCMTK direct vs. DCMTK through two gateway sites.
#
#   direct:   storescu ──DICOM──▶ storescp
#   gateway:  storescu ──DICOM──▶ site A (GW_A) ──TLS link──▶ site B ──DICOM──▶ storescp
#
# Everything runs on loopback in ONE invocation, so the interesting numbers are the ratios
# (the machine is noisy). For each data set, generated at run time (explicit VR little
# endian, random 16-bit pixels, never committed):
#
#   ct    BENCH_CT_COUNT (200) objects of ~512 KiB  (CT, 512x512)
#   mg    BENCH_MG_COUNT (4)   objects of ~40 MiB   (digital mammography, 5120x4096)
#   huge  BENCH_HUGE_COUNT (1) object  of ~256 MiB  (multi-frame word SC, 64 x 2048x1024)
#
# it measures
#   direct     wall time from the start of storescu to its exit (storescp writes each
#              object before it answers, so everything is on disk by then);
#   ack-at-A   wall time of the same storescu sending to site A (every C-STORE-RSP from A
#              follows A's synced commit);
#   end-to-end from the start of that storescu until storescp behind site B holds all N
#              objects complete: the data-set sizes (file minus preamble and group-0002
#              meta) match the inputs; the end time is the newest mtime among those files;
#   e2e/dir    end-to-end MB/s over direct MB/s (= direct time / end-to-end time);
#   peak RSS   VmHWM of site A, site B and storescp (fresh processes for every run;
#              storescp without --fork), read just before stopping them;
#   verify     the multiset of SHA-256 of the data sets (file minus the first
#              132 + 12 + value of (0002,0000) bytes) is the same for the inputs, the direct
#              output and the output through the gateways. A mismatch fails the run.
#
# All DICOM hops use 128 KiB PDUs (storescu -pdu/--max-send-pdu 131072, storescp -pdu
# 131072). MB = 10^6 bytes of data set (what goes over the wire); RSS in MiB. Note that
# storescp never fsyncs (direct = page-cache speed) while each site answers only after a
# synced commit, and that a site forwards an object only once it has all of it.
#
# Run from anywhere (the binary must already be built; this script never runs cargo):
#
#   bash benches/dcmtk_side_by_side.sh                      # ~1-2 minutes on 2 cores
#   BENCH_CT_COUNT=20 BENCH_DATASETS="ct mg" BENCH_REPEAT=1 bash benches/dcmtk_side_by_side.sh  # quick
#
# Environment:
#   DICOM_GATEWAY_BIN        gateway binary
#                            (default ${CARGO_TARGET_DIR:-/var/tmp/dicom-gateway-target}/release/dicom-gateway)
#   BENCH_DATASETS           which data sets, in order (default "ct mg huge")
#   BENCH_CT_COUNT, BENCH_MG_COUNT, BENCH_HUGE_COUNT   object counts (default 200, 4, 1)
#   BENCH_REPEAT             runs (direct, then gateways) per data set (default 5); the table
#                            shows medians, and the peak RSS over the runs
#   BENCH_DELIVERY_TIMEOUT   seconds to wait for delivery through the gateways (default 300)
#   BENCH_STALL_TIMEOUT      ... give up earlier once storescp's output stopped growing (default 60)
#   BENCH_KEEP=1             keep the data in the work directory (logs and results are
#                            always kept; everything is kept when something failed)
#   DCMTK_BIN_DIR            where DCMTK's storescu/storescp are (default /usr/bin; never PATH,
#                            pynetdicom installs its own storescu/storescp)
#   PYTHON                   python with pydicom (default python3)
#
# Output: a table on stdout, results.tsv and every log (gateways' stderr included, grepped
# for WARN/ERROR at the end) in a fresh /tmp/dicom-gateway-bench.XXXXXX directory.
# Exit status 0 only if every object arrived, byte for byte, both ways.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../tests/interop/lib.sh
source "$HERE/../tests/interop/lib.sh"
LOG_TAG=bench
LOG_FD=2
POLL_INTERVAL=0.1

BIN=${DICOM_GATEWAY_BIN:-${CARGO_TARGET_DIR:-/var/tmp/dicom-gateway-target}/release/dicom-gateway}
[[ $BIN == /* ]] || BIN="$PWD/$BIN"
read -r -a DATASETS <<<"${BENCH_DATASETS:-ct mg huge}"
declare -A COUNT=([ct]=${BENCH_CT_COUNT:-200} [mg]=${BENCH_MG_COUNT:-4} [huge]=${BENCH_HUGE_COUNT:-1})
DELIVERY_TIMEOUT=${BENCH_DELIVERY_TIMEOUT:-300}
STALL_TIMEOUT=${BENCH_STALL_TIMEOUT:-60}
KEEP=${BENCH_KEEP:-0}
PDU=131072
REPEAT=${BENCH_REPEAT:-5}

FAILED=0
WORK=""

now_us() { echo "${EPOCHREALTIME//[.,]/}"; }

# ------------------------------------------------------------------ processes

hwm_mib() { # pid: peak resident set size in MiB
	awk '/^VmHWM:/ { printf "%.1f", $2 / 1024; found = 1 } END { if (!found) print "n/a" }' \
		"/proc/$1/status" 2>/dev/null || echo n/a
}

cleanup() {
	local rc=$?
	set +e
	stop_all_bg
	((rc == 0 && FAILED > 0)) && rc=1
	if [[ -n $WORK && -d $WORK ]]; then
		if ((rc == 0)) && [[ $KEEP != 1 ]]; then
			rm -rf "$WORK/in" "$WORK/out" "$WORK"/gw-*/data-?
			log "work directory (logs and results only): $WORK"
		else
			log "work directory kept: $WORK"
		fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -------------------------------------------------------------------- helpers

metric() { # url name label-substring: print the metric's value (0 if absent)
	curl -s -m 5 "$1" 2>/dev/null | awk -v n="$2" -v l="$3" \
		'index($1, n "{") == 1 && index($1, l) { v = $2 } END { print v + 0 }'
}

# gen_data KIND COUNT DIR: write COUNT objects of KIND into DIR.
gen_data() {
	"$PY" - "$@" <<'EOF'
import os, sys
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

kind, count, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# kind: (SOP class, modality, rows, columns, frames)
SPEC = {
    "ct": ("1.2.840.10008.5.1.4.1.1.2", "CT", 512, 512, 1),
    "mg": ("1.2.840.10008.5.1.4.1.1.1.2", "MG", 5120, 4096, 1),
    "huge": ("1.2.840.10008.5.1.4.1.1.7.3", "OT", 2048, 1024, 64),
}
sop_class, modality, rows, cols, frames = SPEC[kind]
os.makedirs(out, exist_ok=True)
study, series = generate_uid(), generate_uid()
for i in range(count):
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.PatientName = "BENCH^" + kind.upper()
    ds.PatientID = "BENCH-" + kind
    ds.StudyDate = "20240102"
    ds.SeriesNumber = 1
    ds.InstanceNumber = i + 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = os.urandom(rows * cols * frames * 2)
    ds["PixelData"].VR = "OW"
    path = os.path.join(out, "%s%05d.dcm" % (kind, i))
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
EOF
}

# The data set of a Part-10 file starts at 132 + 12 + value of (0002,0000).
PY_DS_START='
import struct
def ds_start(path):
    with open(path, "rb") as f:
        h = f.read(144)
    if len(h) < 144 or h[128:132] != b"DICM" or h[132:138] != b"\x02\x00\x00\x00UL":
        return None
    return 144 + struct.unpack_from("<I", h, 140)[0]
'

ds_sizes() { # dir: data-set sizes of its files, one a line, sorted
	"$PY" - "$1" <<EOF
import os, sys
$PY_DS_START
d = sys.argv[1]
for n in sorted(os.path.getsize(os.path.join(d, f)) - ds_start(os.path.join(d, f)) for f in os.listdir(d)):
    print(n)
EOF
}

# wait_delivery DIR SIZES_FILE PID...: wait until DIR holds exactly the data-set sizes in
# SIZES_FILE; print "<newest mtime, us> <detection time, us>". Exits 2 on a stall (no growth
# for STALL_TIMEOUT s), 3 when a PID died, 4 on DELIVERY_TIMEOUT.
wait_delivery() {
	"$PY" - "$DELIVERY_TIMEOUT" "$STALL_TIMEOUT" "$@" <<EOF
import os, sys, time
$PY_DS_START
timeout, stall, d, sizes_file = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
pids = sys.argv[5:]
want = [int(x) for x in open(sys.argv[4]).read().split()]
start = last_change = time.monotonic()
next_report = start + 15
last_total, starts = -1, {}
def alive(pid):
    try:
        with open("/proc/%s/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
while True:
    sizes, newest, total = [], 0, 0
    for e in os.scandir(d):
        st = e.stat()
        total += st.st_size
        if e.name not in starts and st.st_size >= 144:
            s = ds_start(e.path)
            if s is not None:
                starts[e.name] = s
        if e.name in starts:
            sizes.append(st.st_size - starts[e.name])
            newest = max(newest, st.st_mtime_ns)
    if sorted(sizes) == want:
        print(newest // 1000, time.time_ns() // 1000)
        sys.exit(0)
    now = time.monotonic()
    if total != last_total:
        last_total, last_change = total, now
    if now >= next_report:
        print("  %d of %d objects, %.1f MB so far" % (len(sizes), len(want), total / 1e6), file=sys.stderr)
        next_report = now + 15
    if now - last_change > stall:
        print("stalled: %d of %d objects after %.0fs" % (len(sizes), len(want), now - start), file=sys.stderr)
        sys.exit(2)
    if not all(alive(p) for p in pids):
        print("a process died: %d of %d objects" % (len(sizes), len(want)), file=sys.stderr)
        sys.exit(3)
    if now - start > timeout:
        print("timeout: %d of %d objects" % (len(sizes), len(want)), file=sys.stderr)
        sys.exit(4)
    time.sleep(0.05)
EOF
}

verify() { # dir...: same multiset of data-set SHA-256 in every dir
	"$PY" - "$@" <<EOF
import collections, hashlib, os, sys
$PY_DS_START
def digests(d):
    c = collections.Counter()
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        s = ds_start(p)
        if s is None:
            c["<no group length: %s>" % name] += 1
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            f.seek(s)
            while chunk := f.read(1 << 20):
                h.update(chunk)
        c[h.hexdigest()] += 1
    return c
ref = digests(sys.argv[1])
ok = True
for d in sys.argv[2:]:
    got = digests(d)
    if got != ref:
        ok = False
        print("MISMATCH %s vs %s: %d missing, %d extra" % (sys.argv[1], d,
              sum((ref - got).values()), sum((got - ref).values())))
print("%d data sets, SHA-256 multisets %s" % (sum(ref.values()), "equal" if ok else "DIFFER"))
sys.exit(0 if ok else 1)
EOF
}

# send PORT CALLED_AE LOGFILE FILE...: storescu; sets SENT (successful stores).
send() {
	local port=$1 called=$2 logf=$3 rc=0
	shift 3
	timeout 900 "$STORESCU" -v -nh -to 30 -ta 30 -td 300 -pdu "$PDU" --max-send-pdu "$PDU" \
		-aet BENCH_SCU -aec "$called" 127.0.0.1 "$port" "$@" >"$logf" 2>&1 || rc=$?
	SENT=$(grep -c 'Received Store Response (Success)' "$logf" || true)
	((rc == 0)) || log "  storescu exit status $rc (log $logf)"
}

# ------------------------------------------------------------------- the runs

# R_* hold one data set's results; all times in microseconds.
direct_run() { # run
	local ds=$1 port t0 t1
	read -r port <<<"$(free_ports 1)"
	start_storescp "$port" "$WORK/out/direct-$ds" "$WORK/logs/$ds-storescp-direct.log" -pdu "$PDU" || {
		fail "[$ds] direct: storescp did not start"
		return 0
	}
	t0=$(now_us)
	send "$port" STORESCP "$WORK/logs/$ds-storescu-direct.log" "${FILES[@]}"
	t1=$(now_us)
	R_SCP_DIRECT=$(hwm_mib "$SCP_PID")
	stop_bg "$SCP_PID" storescp || true
	R_DIRECT=$((t1 - t0))
	log "[$ds] direct: $SENT/${#FILES[@]} stored in $(fmt_s "$R_DIRECT") s"
	((SENT == ${#FILES[@]})) || fail "[$ds] direct: only $SENT of ${#FILES[@]} objects stored"
}

gateway_run() { # run data-set
	local ds=$1 set=$2 t0 t1 rc=0 res name
	local run="$WORK/gw-$ds" out="$WORK/out/gw-$ds"
	mkdir -p "$run"
	read -r P_SCP P_A_DICOM P_A_HTTP P_B_HTTP P_B_LINK <<<"$(free_ports 5)"
	write_configs "$run" "$WORK"
	start_storescp "$P_SCP" "$out" "$WORK/logs/$ds-storescp-gw.log" -pdu "$PDU" || {
		fail "[$ds] gateway: storescp did not start"
		return 0
	}
	start_sites "$run" "$WORK/logs/$ds-"
	if ! wait_sites_ready 60 0.2; then
		tail -n 20 "$WORK/logs/$ds-site-a.log" "$WORK/logs/$ds-site-b.log" >&2
		fail "[$ds] gateways not ready within 60s (A /readyz $READY_A, B /readyz $READY_B)"
		stop_bg "${GW_PID[a]}" site-a || true
		stop_bg "${GW_PID[b]}" site-b || true
		stop_bg "$SCP_PID" storescp || true
		return 0
	fi

	# The watcher runs during the send; its end time is the newest mtime, not its own poll.
	wait_delivery "$out" "$WORK/in/$set.sizes" "${GW_PID[a]}" "${GW_PID[b]}" "$SCP_PID" \
		>"$run/delivered" 2>"$WORK/logs/$ds-wait.log" &
	local watcher=$!
	PIDS+=("$watcher")
	sleep 0.5 # let it start up before the clock does
	t0=$(now_us)
	send "$P_A_DICOM" GW_A "$WORK/logs/$ds-storescu-gw.log" "${FILES[@]}"
	t1=$(now_us)
	R_ACK=$((t1 - t0))
	log "[$ds] through site A: $SENT/${#FILES[@]} acknowledged in $(fmt_s "$R_ACK") s"
	((SENT == ${#FILES[@]})) || fail "[$ds] gateway: site A acknowledged only $SENT of ${#FILES[@]} objects"
	wait "$watcher" || rc=$?
	forget "$watcher"
	if ((rc == 0)) && read -r res _ <"$run/delivered"; then
		R_E2E=$((res - t0))
		log "[$ds] through the gateways: all ${#FILES[@]} delivered after $(fmt_s "$R_E2E") s"
	else
		cat "$WORK/logs/$ds-wait.log" >&2
		fail "[$ds] delivery through the gateways incomplete (watcher status $rc)"
	fi

	# Let both sites record the confirmations (so shutdown interrupts nothing), then stop.
	local deadline=$SECONDS
	((rc != 0)) || deadline=$((SECONDS + 30))
	while ((SECONDS < deadline)); do
		(($(metric "http://127.0.0.1:$P_A_HTTP/metrics" dicom_gateway_forwarded_objects_total site-b) >= ${#FILES[@]})) &&
			(($(metric "http://127.0.0.1:$P_B_HTTP/metrics" dicom_gateway_forwarded_objects_total pacs) >= ${#FILES[@]})) && break
		sleep 0.2
	done
	curl -s -m 5 "http://127.0.0.1:$P_A_HTTP/metrics" >"$WORK/logs/$ds-metrics-a.txt" || true
	curl -s -m 5 "http://127.0.0.1:$P_B_HTTP/metrics" >"$WORK/logs/$ds-metrics-b.txt" || true
	R_RSS_A=$(hwm_mib "${GW_PID[a]}")
	R_RSS_B=$(hwm_mib "${GW_PID[b]}")
	R_SCP_GW=$(hwm_mib "$SCP_PID")
	for name in a b; do stop_bg "${GW_PID[$name]}" "site-$name" || true; done
	stop_bg "$SCP_PID" storescp || true
	R_WARN=$(cat "$WORK/logs/$ds-site-a.log" "$WORK/logs/$ds-site-b.log" | sed 's/\x1b\[[0-9;]*m//g' |
		grep -c -E '\b(WARN|ERROR)\b' || true)
}

fmt_s() { awk -v u="$1" 'BEGIN { printf "%.2f", u / 1e6 }'; }

# ----------------------------------------------------------------------- main

need_dcmtk || exit 1
[[ -x $BIN ]] || {
	log "gateway binary $BIN not found (build it, or set DICOM_GATEWAY_BIN)"
	exit 1
}
"$PY" -c 'import pydicom' || {
	log "$PY cannot import pydicom"
	exit 1
}
command -v curl >/dev/null || {
	log "curl not found"
	exit 1
}

WORK=$(mktemp -d /tmp/dicom-gateway-bench.XXXXXX)
mkdir -p "$WORK/logs" "$WORK/out" "$WORK/in"
log "work directory $WORK, gateway $BIN"
init_keys "$WORK" "$WORK/logs"

RESULTS="$WORK/results.tsv"
printf 'dataset\trep\tobjects\tbytes\tdirect_us\tack_us\te2e_us\trss_a\trss_b\trss_scp_direct\trss_scp_gw\tverify\tgw_warn_lines\n' >"$RESULTS"
for ds in "${DATASETS[@]}"; do
	[[ -n ${COUNT[$ds]:-} ]] || {
		log "unknown data set $ds (ct, mg, huge)"
		exit 1
	}
	((COUNT[$ds] > 0)) || continue
	log "[$ds] generating ${COUNT[$ds]} objects"
	gen_data "$ds" "${COUNT[$ds]}" "$WORK/in/$ds"
	ds_sizes "$WORK/in/$ds" >"$WORK/in/$ds.sizes"
	BYTES=$(awk '{ s += $1 } END { print s }' "$WORK/in/$ds.sizes")
	FILES=("$WORK/in/$ds"/*.dcm)
	cat "${FILES[@]}" >/dev/null # into the page cache, for both runs alike
	for ((rep = 1; rep <= REPEAT; rep++)); do
		run="$ds-$rep"
		R_DIRECT="" R_ACK="" R_E2E="" R_RSS_A="" R_RSS_B="" R_SCP_DIRECT="" R_SCP_GW="" R_VERIFY=FAIL R_WARN=""
		direct_run "$run"
		gateway_run "$run" "$ds"
		if verify "$WORK/in/$ds" "$WORK/out/direct-$run" "$WORK/out/gw-$run" >"$WORK/logs/$run-verify.log" 2>&1; then
			R_VERIFY=ok
			log "[$run] verify: $(tail -n 1 "$WORK/logs/$run-verify.log")"
		else
			cat "$WORK/logs/$run-verify.log" >&2
			fail "[$run] data sets differ between inputs, direct and gateway output"
		fi
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ds" "$rep" "${COUNT[$ds]}" "$BYTES" \
			"$R_DIRECT" "$R_ACK" "$R_E2E" "$R_RSS_A" "$R_RSS_B" "$R_SCP_DIRECT" "$R_SCP_GW" "$R_VERIFY" "$R_WARN" >>"$RESULTS"
		# free the disk and page cache before the next run
		[[ $KEEP == 1 ]] || rm -rf "$WORK/out/direct-$run" "$WORK/out/gw-$run" "$WORK/gw-$run"/data-?
	done
	[[ $KEEP == 1 ]] || rm -rf "$WORK/in/$ds"
done

echo
"$PY" - "$RESULTS" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def num(v):
    try:
        return float(v)
    except ValueError:
        return None
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
def fmt(v, f="%.1f"):
    return "n/a" if v is None else f % v
def secs(us):
    return fmt(None if us is None else us / 1e6, "%.2f")
cols = "%-7s %7s %7s %8s %8s %8s %7s %6s %6s | %6s %6s %6s | %7s %6s %4s %6s"
print(cols % ("dataset", "objects", "MB", "direct", "ack-at-A", "end2end", "e2e/dir", "RSS A", "RSS B",
              "direct", "ack@A", "e2e", "SCP dir", "SCP gw", "reps", "verify"))
print(cols % ("", "", "", "MB/s", "MB/s", "MB/s", "", "MiB", "MiB", "s", "s", "s", "MiB", "MiB", "", ""))
for ds in dict.fromkeys(r["dataset"] for r in rows):
    rs = [r for r in rows if r["dataset"] == ds]
    mb = int(rs[0]["bytes"]) / 1e6
    t = {k: med(num(r[k]) for r in rs) for k in ("direct_us", "ack_us", "e2e_us")}
    rate = {k: (mb / (v / 1e6) if v else None) for k, v in t.items()}
    ratios = [num(r["direct_us"]) / num(r["e2e_us"]) for r in rs if num(r["direct_us"]) and num(r["e2e_us"])]
    peak = {k: max((num(r[k]) for r in rs if num(r[k]) is not None), default=None)
            for k in ("rss_a", "rss_b", "rss_scp_direct", "rss_scp_gw")}
    ok = all(r["verify"] == "ok" for r in rs)
    print(cols % (ds, rs[0]["objects"], "%.1f" % mb, fmt(rate["direct_us"]), fmt(rate["ack_us"]),
                  fmt(rate["e2e_us"]), fmt(med(ratios), "%.3f"), fmt(peak["rss_a"]), fmt(peak["rss_b"]),
                  secs(t["direct_us"]), secs(t["ack_us"]), secs(t["e2e_us"]), fmt(peak["rss_scp_direct"]),
                  fmt(peak["rss_scp_gw"]), len(rs), "ok" if ok else "FAIL"))
print("\nmedians over the repetitions (e2e/dir: median of the per-repetition ratios); RSS: peak over them")
print("per repetition: seconds direct / ack-at-A / end-to-end, RSS A / B MiB, verify, WARN/ERROR lines in A+B logs")
for r in rows:
    print("  %-5s #%-2s %6s / %6s / %6s   %6s / %6s   %-4s %s" % (r["dataset"], r["rep"], secs(num(r["direct_us"])),
          secs(num(r["ack_us"])), secs(num(r["e2e_us"])), r["rss_a"] or "n/a", r["rss_b"] or "n/a", r["verify"],
          r["gw_warn_lines"] or "n/a"))
EOF
echo

# Anything the gateways had to complain about: distinct WARN/ERROR messages (timestamps and
# per-object fields stripped), counted over all runs.
for f in "$WORK"/logs/*-site-?.log; do
	[[ -e $f ]] || continue
	site=${f##*-}
	sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -E '\b(WARN|ERROR)\b' |
		sed -E "s/^[^ ]+ +/site-${site%.log}: /; s/ (object|retry_in_ms)=[^ ]+//g" || true
done >"$WORK/logs/warnings.txt"
warns=$(wc -l <"$WORK/logs/warnings.txt")
echo "gateway logs: $warns WARN/ERROR lines over all runs"
sort "$WORK/logs/warnings.txt" | uniq -c | sort -rn | sed 's/^/    /'
echo "results: $RESULTS; logs: $WORK/logs"
((FAILED == 0)) || {
	echo "bench: $FAILED failure(s)"
	exit 1
}
