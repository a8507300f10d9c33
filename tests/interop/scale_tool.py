#!/usr/bin/env python3
"""Helpers of scale_out.sh: the link Service, the DICOM Service's sender, and the checks.

    scale_tool.py lb PORT STATS BACKEND_PORT...
        The "link Service": a TCP load balancer on 127.0.0.1:PORT that hands each new
        connection to the next backend (127.0.0.1:BACKEND_PORT) in round robin and then
        copies bytes both ways, untouched (the link's TLS and the peer's identity go end to
        end; nothing is terminated here). A backend that refuses the connection is skipped
        for that connection (the next one is tried), as a Service does once the dead pod's
        endpoint is gone. STATS (JSON, rewritten after each change) counts per backend:
        connections handed over, refused connects, bytes each way. Logs each connection.

    scale_tool.py send WORK FILES_DIR HOST PORT... [--batch N] [--threads N]
        The "DICOM Service": C-STORE every Part-10 file of FILES_DIR (sorted) with
        pynetdicom, in associations of --batch files (default 20), association k to
        PORT[k mod len(PORT)] (round robin over the replicas), --threads associations at
        once (default 2). Each file's data set bytes go on the wire unchanged; a file is
        retried (on the next association) until the replica answers Success. Appends to
        WORK/acked.tsv one line per acknowledged object: SOP Instance UID, SHA-256 of the
        data set, the port that acknowledged it. Prints `send: N/N acknowledged (...)`.

    scale_tool.py metric PORT NAME [LABEL=VALUE...]
        The value of dicom_gateway_NAME{LABEL="VALUE",...} on 127.0.0.1:PORT/metrics (the
        sum over the series that match), 0 if the node exports no such series; exit 1 if
        the node does not answer.

    scale_tool.py queue STATUS_JSON...
        From `dicom-gateway status --json` outputs: "queued in_flight dead" summed over
        their destinations, one line per file (`- - -` for a file that does not parse).

    scale_tool.py check SENT_DIR ACKED_TSV RECEIVED_DIR [--exactly-once] [--max-dups N]
        What reached the PACS (RECEIVED_DIR, storescp's output) against what was sent
        (SENT_DIR) and acknowledged (ACKED_TSV), by the SHA-256 of the data set (the bytes
        after the file meta). Prints PASS/FAIL/DETAIL lines (tab-separated) for
        scale_out.sh and last a line `COUNTS acked sent received lost corrupted duplicates`.
        Lost: acknowledged, never arrived. Corrupted: a file whose data set matches nothing
        sent. Duplicates: extra copies, all identical to a sent object by construction
        (each is listed with its SOP Instance UID). --exactly-once: a duplicate is a
        failure; else --max-dups bounds them.

    scale_tool.py self-test
        The check must fail on a lost, a changed and a doubled object (exactly once).
"""

import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request


# --------------------------------------------------------------------------- balancer

def lb(port, stats_path, backends):
    stats = {
        "backends": [
            {"port": b, "connections": 0, "refused": 0, "bytes_up": 0, "bytes_down": 0, "open": 0}
            for b in backends
        ],
        "accepted": 0,
        "unrouted": 0,
    }
    nxt = [0]

    def save():
        tmp = stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, stats_path)

    def log(msg):
        print("%.3f lb: %s" % (time.time(), msg), flush=True)

    async def pipe(reader, writer, st, key):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                st[key] += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
            except (ConnectionError, OSError, RuntimeError):
                pass

    async def handle(creader, cwriter):
        stats["accepted"] += 1
        conn = stats["accepted"]
        start = nxt[0]
        nxt[0] += 1
        chosen = None
        for i in range(len(backends)):
            st = stats["backends"][(start + i) % len(backends)]
            try:
                breader, bwriter = await asyncio.open_connection("127.0.0.1", st["port"])
            except OSError as e:
                st["refused"] += 1
                log("connection %d: backend :%d refused (%s), trying the next" % (conn, st["port"], e))
                continue
            chosen = st
            break
        if chosen is None:
            stats["unrouted"] += 1
            save()
            log("connection %d: no backend took it" % conn)
            cwriter.close()
            return
        chosen["connections"] += 1
        chosen["open"] += 1
        save()
        log("connection %d -> backend :%d" % (conn, chosen["port"]))
        await asyncio.gather(
            pipe(creader, bwriter, chosen, "bytes_up"), pipe(breader, cwriter, chosen, "bytes_down")
        )
        for w in (bwriter, cwriter):
            w.close()
        chosen["open"] -= 1
        save()
        log("connection %d to :%d closed (%d bytes up, %d down so far on that backend)"
            % (conn, chosen["port"], chosen["bytes_up"], chosen["bytes_down"]))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        save()
        log("listening on :%d, backends %s" % (port, " ".join(":%d" % b for b in backends)))
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ----------------------------------------------------------------------------- sender

def dataset_sha(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[128:132] != b"DICM":
        return None
    meta_len = int.from_bytes(data[140:144], "little")
    return hashlib.sha256(data[144 + meta_len:]).hexdigest()


def send(work, files_dir, host, ports, batch, threads):
    import logging

    import pydicom
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    paths = sorted(os.path.join(files_dir, n) for n in os.listdir(files_dir) if n.endswith(".dcm"))
    todo = []
    contexts = set()
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        contexts.add((str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        todo.append((p, str(ds.SOPInstanceUID), dataset_sha(p)))
    batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    lock = threading.Lock()
    assoc_no = [0]
    acked = [0]
    per_port = {p: 0 for p in ports}
    failures = [0]
    out = open(os.path.join(work, "acked.tsv"), "a")

    def worker():
        ae = AE(ae_title="SCALESCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class, ts in sorted(contexts):
            ae.add_requested_context(sop_class, ts)
        while True:
            with lock:
                if not batches:
                    return
                b = batches.pop(0)
                port = ports[assoc_no[0] % len(ports)]
                assoc_no[0] += 1
            assoc = ae.associate(host, port, ae_title="GW_A")
            left = list(b)
            if assoc.is_established:
                while left:
                    path, uid, sha = left[0]
                    try:
                        status = assoc.send_c_store(path)
                    except Exception:  # noqa: BLE001 - any failure: retry the file
                        status = None
                    if status is None or getattr(status, "Status", None) != 0:
                        break
                    with lock:
                        out.write("%s\t%s\t%d\n" % (uid, sha, port))
                        out.flush()
                        acked[0] += 1
                        per_port[port] += 1
                    left.pop(0)
                if assoc.is_established:
                    if left:
                        assoc.abort()
                    else:
                        assoc.release()
            if left:
                with lock:
                    failures[0] += 1
                    batches.insert(0, left)
                time.sleep(0.2)

    t0 = time.time()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.close()
    print("send: %d/%d acknowledged in %.1f s over %d associations (%s; %d failed associations retried)"
          % (acked[0], len(todo), time.time() - t0, assoc_no[0],
             ", ".join(":%d %d" % (p, n) for p, n in per_port.items()), failures[0]))
    return 0 if acked[0] == len(todo) else 1


# ---------------------------------------------------------------------------- metrics

def metric(port, name, labels):
    want = {}
    for lv in labels:
        k, v = lv.split("=", 1)
        want[k] = v
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=3) as r:
            text = r.read().decode()
    except Exception:  # noqa: BLE001 - node down
        return 1
    full = "dicom_gateway_" + name
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(full):
            continue
        series, _, value = line.rpartition(" ")
        if series == full:
            got = {}
        elif series.startswith(full + "{") and series.endswith("}"):
            got = {}
            for part in series[len(full) + 1:-1].split(","):
                if "=" in part:
                    k, v = part.split("=", 1)
                    got[k] = v.strip('"')
        else:
            continue
        if all(got.get(k) == v for k, v in want.items()):
            total += float(value)
    print(int(total) if total == int(total) else total)
    return 0


def queue(files):
    for path in files:
        try:
            with open(path) as f:
                st = json.load(f)
            d = st["destinations"]
            print(sum(x["queued"] for x in d), sum(x["in_flight"] for x in d), sum(x["dead"] for x in d))
        except Exception:  # noqa: BLE001 - node down or garbage
            print("- - -")
    return 0


# ----------------------------------------------------------------------------- checks

def check(sent_dir, acked_tsv, received_dir, exactly_once, max_dups):
    sent = {}
    for n in os.listdir(sent_dir):
        p = os.path.join(sent_dir, n)
        h = dataset_sha(p)
        if h:
            sent[h] = n
    uid_of = {}
    acked = set()
    by_port = {}
    with open(acked_tsv) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            acked.add(parts[1])
            uid_of[parts[1]] = parts[0]
            if len(parts) > 2:
                by_port[parts[1]] = parts[2]
    got = {}
    other = []
    for root, _, names in os.walk(received_dir):
        for n in names:
            p = os.path.join(root, n)
            h = dataset_sha(p)
            if h is None:
                other.append(p)
                continue
            got.setdefault(h, []).append(n)
    lost = sorted(h for h in acked if h not in got)
    corrupt = sorted(h for h in got if h not in sent)
    dups = {h: len(v) for h, v in got.items() if len(v) > 1 and h in sent}
    n_dups = sum(c - 1 for c in dups.values())
    received = sum(len(v) for v in got.values())
    out = []
    if lost:
        out.append(("FAIL", "%d of %d acknowledged objects never reached the PACS" % (len(lost), len(acked))))
        for h in lost[:10]:
            out.append(("DETAIL", "lost: %s (%s, acknowledged by :%s)" % (uid_of.get(h), sent.get(h), by_port.get(h, "?"))))
    else:
        out.append(("PASS", "0 lost: all %d acknowledged objects reached the PACS" % len(acked)))
    if corrupt or other:
        out.append(("FAIL", "%d files at the PACS match nothing that was sent (%d are not Part 10)"
                    % (len(corrupt) + len(other), len(other))))
        for h in corrupt[:5]:
            out.append(("DETAIL", "corrupted: %s" % got[h][0]))
        for p in other[:5]:
            out.append(("DETAIL", "not Part 10: %s" % p))
    else:
        out.append(("PASS", "0 corrupted: each of the %d files at the PACS carries the data set of a sent object, byte for byte" % received))
    for h, c in sorted(dups.items(), key=lambda x: uid_of.get(x[0], "")):
        out.append(("DETAIL", "identical re-send: %s (%s) arrived %d times, acknowledged by :%s"
                    % (uid_of.get(h, "?"), sent[h], c, by_port.get(h, "?"))))
    if exactly_once:
        if n_dups or len(got) != len(sent):
            out.append(("FAIL", "not exactly once: %d distinct of %d sent arrived, %d extra copies" % (len(got), len(sent), n_dups)))
        else:
            out.append(("PASS", "exactly once: %d distinct objects, %d files, no duplicate" % (len(got), received)))
    elif max_dups is not None:
        if n_dups <= max_dups:
            out.append(("PASS", "%d duplicates, all identical re-sends of %d objects (at most %d: what was in flight at the kill)"
                        % (n_dups, len(dups), max_dups)))
        else:
            out.append(("FAIL", "%d duplicates (of %d objects), more than the %d that can have been in flight at the kill"
                        % (n_dups, len(dups), max_dups)))
    for verdict, text in out:
        print("%s\t%s" % (verdict, text))
    print("COUNTS\t%d %d %d %d %d %d" % (len(acked), len(sent), received, len(lost), len(corrupt) + len(other), n_dups))
    return 0


def self_test():
    """Doctored copies must fail the exactly-once check."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    tmp = tempfile.mkdtemp(prefix="scale-selftest-")
    try:
        sent = os.path.join(tmp, "sent")
        os.makedirs(sent)
        acked = os.path.join(tmp, "acked.tsv")
        with open(acked, "w") as f:
            for i in range(4):
                ds = Dataset()
                ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
                ds.SOPInstanceUID = generate_uid()
                ds.PatientName = "SELF^TEST"
                ds.PixelData = os.urandom(256)
                ds["PixelData"].VR = "OB"
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = ds.SOPClassUID
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta = meta
                p = os.path.join(sent, "%d.dcm" % i)
                ds.save_as(p, enforce_file_format=True)
                f.write("%s\t%s\t1\n" % (ds.SOPInstanceUID, dataset_sha(p)))

        def run(doctor):
            rec = os.path.join(tmp, "rec")
            shutil.rmtree(rec, ignore_errors=True)
            shutil.copytree(sent, rec)
            doctor(rec)
            import io
            import contextlib
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                check(sent, acked, rec, True, None)
            return [l.split("\t")[0] for l in buf.getvalue().splitlines()]

        def lose(rec):
            os.remove(os.path.join(rec, "0.dcm"))

        def change(rec):
            p = os.path.join(rec, "1.dcm")
            data = bytearray(open(p, "rb").read())
            data[-1] ^= 1
            open(p, "wb").write(bytes(data))

        def double(rec):
            shutil.copyfile(os.path.join(rec, "2.dcm"), os.path.join(rec, "2b.dcm"))

        ok = "FAIL" not in run(lambda rec: None)
        print("self-test: untouched copy %s" % ("passes" if ok else "FAILS"))
        for name, doctor in (("lost", lose), ("changed", change), ("doubled", double)):
            failed = "FAIL" in run(doctor)
            print("self-test: %s object %s" % (name, "fails the check" if failed else "PASSES (wrong)"))
            ok = ok and failed
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "lb":
        lb(int(argv[2]), argv[3], [int(p) for p in argv[4:]])
        return 0
    if cmd == "send":
        args, opts = [], {"--batch": 20, "--threads": 2}
        it = iter(argv[2:])
        for a in it:
            if a in opts:
                opts[a] = int(next(it))
            else:
                args.append(a)
        work, files_dir, host = args[0], args[1], args[2]
        return send(work, files_dir, host, [int(p) for p in args[3:]], opts["--batch"], opts["--threads"])
    if cmd == "metric":
        return metric(int(argv[2]), argv[3], argv[4:])
    if cmd == "queue":
        return queue(argv[2:])
    if cmd == "check":
        exactly = "--exactly-once" in argv
        max_dups = None
        if "--max-dups" in argv:
            max_dups = int(argv[argv.index("--max-dups") + 1])
        return check(argv[2], argv[3], argv[4], exactly, max_dups)
    if cmd == "self-test":
        return self_test()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
