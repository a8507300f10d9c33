#!/usr/bin/env python3
"""Helpers of tests/interop/orthanc.sh (Orthanc as site B's PACS).

    orthanc_tool.py prep OUT_DIR [--count 100]
        OUT_DIR/study/*.dcm: COUNT generated CT objects (gen_study.py's generator);
        OUT_DIR/files.txt: those plus pydicom's corpus files (*.dcm under its
        test_files folder) that are Part 10 and that send_pynetdicom.py can send;
        OUT_DIR/manifest.tsv: path, SOP Instance UID, source (corpus|generated).
        Prints one line per skipped corpus file and a summary line.
    orthanc_tool.py config DIR DICOM_PORT HTTP_PORT AET [SCP_TIMEOUT]
        DIR/orthanc.json: an Orthanc of its own (storage and index in DIR,
        loopback REST without authentication, no plugins, no remote access,
        DicomScpTimeout SCP_TIMEOUT seconds, default 30 as Orthanc's own).
    orthanc_tool.py uids HTTP_PORT
        the SOP Instance UIDs Orthanc stores, sorted, one a line (REST /instances?expand).
    orthanc_tool.py direct PORT AET OUT_TSV FILE_LIST...
        the reference send: each file on an association of its own (so that an
        abort costs that file alone), with send_pynetdicom.py's payload rules,
        list after list, each in send_pynetdicom.py's order (SOP class, transfer
        syntax, path);
        OUT_TSV gets "path<TAB>SOP Instance UID<TAB>verdict" per file, verdict
        "stored", "status 0xXXXX" or "aborted" (the association ended without a
        response). Prints a summary line.
    orthanc_tool.py gw STATUS_JSON_FILE DESTINATION
        "queued in_flight dead delivered" of one destination in `status --json`.
    orthanc_tool.py alive QUEUE_JSON_FILE UID_FILE
        "alive total": of the UIDs in UID_FILE (one a line), how many have an
        entry in `queue list --json` that is not a dead letter.
    orthanc_tool.py dead QUEUE_JSON_FILE
        one line per dead letter of `queue list --dead --json`:
        "SOP_INSTANCE_UID<TAB>attempts<TAB>last reason".
"""

import json
import os
import sys
import urllib.request
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def prep(out, count):
    import tempfile

    import pydicom
    import pydicom.data

    import gen_study
    import send_pynetdicom

    files, _markers = gen_study.gen_study(os.path.join(out, "study"), count, 4)
    base = os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm"))
    corpus = []
    for root, dirs, names in os.walk(base):
        dirs.sort()
        corpus += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(".dcm")]
    usable, skipped = [], []
    for p in corpus:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, stop_before_pixels=True)  # no force: Part 10 only
            if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
                raise ValueError("no transfer syntax in the file meta")
        except Exception as exc:  # noqa: BLE001 - any reader error: not Part 10
            skipped.append((p, "not Part 10 (%s)" % type(exc).__name__))
            continue
        usable.append(p)
    # What send_pynetdicom.py itself cannot send (no SOP class/instance, odd length
    # that re-encoding does not fix): leave out, as it would fail before any PACS judged it.
    with tempfile.TemporaryDirectory() as tmp:
        items, bad = send_pynetdicom.read_pairs(usable, tmp)
    unsendable = dict(bad)
    skipped += [(p, "pynetdicom cannot send it: %s" % unsendable[p]) for p in usable if p in unsendable]
    sops = {it[2]: it for it in items}
    with open(os.path.join(out, "files.txt"), "w") as fl, open(os.path.join(out, "manifest.tsv"), "w") as mf:
        for p in usable:
            if p in sops:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    uid = str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                fl.write(p + "\n")
                mf.write("%s\t%s\tcorpus\n" % (p, uid))
        for path, _cls, _ts, uid in files:
            fl.write(path + "\n")
            mf.write("%s\t%s\tgenerated\n" % (path, uid))
    for p, why in skipped:
        print("skipped %s: %s" % (os.path.relpath(p, base), why))
    n_corpus = len(usable) - len([p for p in usable if p in unsendable])
    print("prep: %d corpus files (%d .dcm found, %d skipped), %d generated" % (n_corpus, len(corpus), len(skipped), len(files)))


def config(d, dicom_port, http_port, aet, scp_timeout=30):
    cfg = {
        "Name": "gateway-test-" + aet,
        "StorageDirectory": os.path.join(d, "storage"),
        "IndexDirectory": os.path.join(d, "index"),
        "StorageCompression": False,
        "Plugins": [],
        "ConcurrentJobs": 1,
        "HttpServerEnabled": True,
        "HttpPort": int(http_port),
        "HttpDescribeErrors": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": int(dicom_port),
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {},
        "UnknownSopClassAccepted": False,
        "OverwriteInstances": False,
        "DicomScpTimeout": int(scp_timeout),
        "SaveJobs": False,
        "StableAge": 60,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
    }
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "orthanc.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def uids(http_port):
    url = "http://127.0.0.1:%d/instances?expand" % int(http_port)
    with urllib.request.urlopen(url, timeout=30) as r:
        data = json.load(r)
    for u in sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in data):
        print(u)


def direct(port, aet, out_tsv, *file_lists):
    import logging
    import tempfile

    from pynetdicom import AE

    import send_pynetdicom  # noqa: F401 - sets chunked sending

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    counts = {}
    with tempfile.TemporaryDirectory() as tmp, open(out_tsv, "w") as out:
        items = []
        for file_list in file_lists:
            with open(file_list) as f:
                paths = [line.strip() for line in f if line.strip()]
            these, bad = send_pynetdicom.read_pairs(paths, tmp)
            if bad:
                sys.exit("direct: %d files cannot be sent: %s" % (len(bad), bad[:3]))
            items += sorted(these, key=lambda it: it[:3])
        for sop_class, ts, path, payload in items:
            ae = AE(ae_title="SENDER")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
            ae.add_requested_context(sop_class, [ts])
            assoc = ae.associate("127.0.0.1", int(port), ae_title=aet)
            if not assoc.is_established:
                verdict = "association %s" % ("rejected" if assoc.is_rejected else "failed")
            else:
                try:
                    status = assoc.send_c_store(payload)
                    code = status.get("Status") if status else None
                except Exception as exc:  # noqa: BLE001
                    code, verdict = None, "error %s" % type(exc).__name__
                if code == 0:
                    verdict = "stored"
                elif code is not None:
                    verdict = "status 0x%04X" % code
                elif assoc.is_aborted:
                    verdict = "aborted"
                else:
                    verdict = "no response"
                if assoc.is_established:
                    assoc.release()
            ae.shutdown()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pydicom

                uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            out.write("%s\t%s\t%s\n" % (path, uid, verdict))
            counts[verdict] = counts.get(verdict, 0) + 1
    print("direct: " + ", ".join("%d %s" % (n, v) for v, n in sorted(counts.items())))


def gw(status_file, dest):
    with open(status_file) as f:
        st = json.load(f)
    d = [x for x in st["destinations"] if x["name"] == dest][0]
    print(d["queued"], d["in_flight"], d["dead"], d["delivered"])


def dead(queue_file):
    with open(queue_file) as f:
        entries = json.load(f)
    for e in entries:
        if e["state"] == "dead":
            print("%s\t%d\t%s" % (e["sop_instance_uid"], e["attempts"], e.get("last_reason") or "-"))


def alive(queue_file, uid_file):
    with open(queue_file) as f:
        entries = json.load(f)
    with open(uid_file) as f:
        wanted = {line.strip() for line in f if line.strip()}
    live = {e["sop_instance_uid"] for e in entries if e["state"] != "dead"}
    print(len(wanted & live), len(wanted))


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "prep":
        count = 100
        if len(args) == 3 and args[1] == "--count":
            count = int(args[2])
        prep(args[0], count)
    elif cmd == "config":
        config(*args)
    elif cmd == "uids":
        uids(args[0])
    elif cmd == "direct":
        direct(*args)
    elif cmd == "gw":
        gw(*args)
    elif cmd == "alive":
        alive(*args)
    elif cmd == "dead":
        dead(args[0])
    else:
        sys.exit("unknown command %s" % cmd)


if __name__ == "__main__":
    main(sys.argv)
