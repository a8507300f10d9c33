#!/usr/bin/env python3
"""Helpers of tests/interop/syntaxes.sh: one object per accepted transfer syntax.

    syntaxes_tool.py parse SOP_RS                 "uid<TAB>name<TAB>const" of TRANSFER_SYNTAXES and RETIRED_JPEG
    syntaxes_tool.py gen OUT SYNTAXES_TSV [--negative UID]...
                                                  one Part 10 file per syntax (OUT/files), OUT/manifest.tsv,
                                                  OUT/storescu.cfg (profile Fn: file n's SOP class and TS only)
    syntaxes_tool.py scp PORT OUT AE SYNTAXES_TSV [--extra UID]...
                                                  Storage SCP (pynetdicom): accepts Secondary Capture in every
                                                  listed (and extra) syntax, writes each received data set raw
                                                  (OUT/N.ds) and a line of OUT/received.tsv, answers 0x0000
    syntaxes_tool.py send HOST PORT CALLED CALLING RESULTS FILE...
                                                  pynetdicom, one association per file, proposing exactly the
                                                  file's own syntax, sending the file's bytes (chunked mode);
                                                  appends "path<TAB>result<TAB>detail" to RESULTS
    syntaxes_tool.py dcmtk-results MANIFEST LOG_PREFIX OUT
                                                  verdicts of the storescu runs (LOG_PREFIX<n>.log, one file
                                                  each) as "path<TAB>result<TAB>detail" lines
    syntaxes_tool.py pick MANIFEST REF_DIR DCMTK_RESULTS PY_RESULTS OUT_TSV
                                                  which sender to use per file: DCMTK where its direct send
                                                  arrived with the file's syntax and data set, else pynetdicom
    syntaxes_tool.py gw STATUS_JSON DEST          "queued in_flight dead delivered" of DEST in `status --json`
    syntaxes_tool.py check MANIFEST SENDERS RESULTS_A PACS_DIR RESULTS_PROPOSE
                                                  the checks through the gateways: "PASS|FAIL<TAB>text" lines
                                                  (RESULTS_PROPOSE: storescu proposing to site A the files it
                                                  does not send there, negative controls included)
    syntaxes_tool.py self-test MANIFEST SENDERS RESULTS_A PACS_DIR RESULTS_PROPOSE
                                                  the same checks on doctored copies: each must fail

Result words: `stored` (status 0x0000), `status 0xXXXX`, `no context` (association up, the
syntax not accepted), `rejected` (association rejected), `aborted`, `error`.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import warnings
import zlib
from collections import defaultdict

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
PATIENT_NAME = "SYNTAXES^MARKER"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
NATIVE = {IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED_LE}
# The whole data set deflated (as the gateway's sop::encoding says).
DEFLATED = {DEFLATED_LE, "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
# JPIP referenced: no Pixel Data, a Pixel Data Provider URL instead.
JPIP = {"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205"}

CONTEXT_RESULT = {
    1: "user rejection",
    2: "no reason",
    3: "abstract syntax not supported",
    4: "transfer syntaxes not supported",
}

TUPLE = re.compile(r'\(\s*"(1\.2\.840\.10008\.1\.2(?:\.[0-9]+)*)"\s*,\s*"([^"]*)"\s*,?\s*\)')


# ------------------------------------------------------------------ parse


def block(src, start_re, end):
    m = re.search(start_re, src, re.M)
    if not m:
        return None
    i = src.find(end, m.end())
    return src[m.end() : i if i >= 0 else len(src)]


def parse(sop_rs):
    """[(uid, name)] of TRANSFER_SYNTAXES, then RETIRED_JPEG (a plain const, or the list
    given to the `retired_jpeg!` macro that defines it)."""
    with open(sop_rs) as f:
        src = f.read()
    out = []
    ts = block(src, r"^pub const TRANSFER_SYNTAXES\s*:[^=]*=\s*&\[", "\n];")
    if ts is None:
        raise SystemExit("parse: no `pub const TRANSFER_SYNTAXES` in %s" % sop_rs)
    out += [(u, n, "TRANSFER_SYNTAXES") for u, n in TUPLE.findall(ts)]
    rj = block(src, r"^pub const RETIRED_JPEG\s*:[^=]*=\s*&\[", "\n];")
    if rj is None or not TUPLE.search(rj):
        rj = block(src, r"^retired_jpeg!\(", "\n);")
    if rj is not None:
        out += [(u, n, "RETIRED_JPEG") for u, n in TUPLE.findall(rj)]
    seen, uniq = set(), []
    for uid, name, const in out:
        if uid not in seen:
            seen.add(uid)
            uniq.append((uid, name, const))
    return uniq


def read_syntaxes(path):
    with open(path) as f:
        return [tuple(line.rstrip("\n").split("\t")[:2]) for line in f if line.strip()]


# -------------------------------------------------------------------- gen


def register_uids(uids):
    """Make pydicom (and so pynetdicom) know every UID we send as a transfer syntax:
    pydicom 3.0 does not know JPEG XL, nor our made-up negative controls."""
    import pydicom.uid
    from pydicom._uid_dict import UID_dictionary

    for uid in uids:
        u = pydicom.uid.UID(uid)
        if u.is_private:
            u.set_private_encoding(False, True)
        elif uid not in UID_dictionary:
            UID_dictionary[uid] = ("Test Transfer Syntax %s" % uid, "Transfer Syntax", "", "", "")


def encode_data_set(ds, ts):
    """The data set's bytes in `ts`, deflated where the syntax says so, even length."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_implicit_VR = ts == IMPLICIT_LE
    fp.is_little_endian = ts != EXPLICIT_BE
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if ts in DEFLATED:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
        if len(raw) % 2:
            raw += b"\0"
    assert len(raw) % 2 == 0
    return raw


def make_data_set(n, ts, name, study_uid, series_uid):
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = SC_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "SYN%04d" % n
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesDescription = ("TS %s %s" % (ts, name))[:64]
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "SYNTAXES-%04d" % n
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = bytes((n * 7 + i * 13) & 0xFF for i in range(64))
    if ts in JPIP:
        ds.PixelDataProviderURL = "http://127.0.0.1:9/jpip/%s?syntax=%s" % (ds.SOPInstanceUID, ts)
    elif ts in NATIVE:
        ds.PixelData = pixels
        ds["PixelData"].VR = "OB"
    else:
        # Arbitrary bytes: the gateway never decodes pixels. Basic offset table + one fragment.
        ds.PixelData = encapsulate([b"\xff\xd8SYNTAX" + ts.encode() + pixels + b"\xff\xd9"], has_bot=True)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return ds


def write_part10(path, ds, ts, raw):
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SYNTAXES_TEST"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + buf.getvalue() + raw)


def gen(out, syntaxes_tsv, negatives):
    from pydicom.uid import generate_uid

    syntaxes = read_syntaxes(syntaxes_tsv)
    register_uids([u for u, _ in syntaxes] + negatives)
    files = os.path.join(out, "files")
    os.makedirs(files, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    rows = []
    items = [(u, n, "listed") for u, n in syntaxes] + [(u, "not accepted (negative control)", "negative") for u in negatives]
    for n, (ts, name, kind) in enumerate(items, 1):
        ds = make_data_set(n, ts, name, study_uid, series_uid)
        raw = encode_data_set(ds, ts)
        path = os.path.join(files, "%02d_%s.dcm" % (n, ts))
        write_part10(path, ds, ts, raw)
        rows.append((str(n), path, ts, kind, str(ds.SOPInstanceUID), hashlib.sha256(raw).hexdigest(), str(len(raw)), name))
    with open(os.path.join(out, "manifest.tsv"), "w") as f:
        for r in rows:
            f.write("\t".join(r) + "\n")
    write_storescu_cfg(os.path.join(out, "storescu.cfg"), rows)
    print(
        "gen: %d files (%d listed syntaxes, %d negative controls), Secondary Capture, study %s"
        % (len(rows), len(syntaxes), len(negatives), study_uid)
    )


def write_storescu_cfg(path, rows):
    """DCMTK association profiles: Fn proposes file n's SOP class with file n's syntax only."""
    lines = ["# generated by tests/interop/syntaxes_tool.py", "[[TransferSyntaxes]]", ""]
    for r in rows:
        lines += ["[TS%s]" % r[0], "TransferSyntax1 = %s" % r[2], ""]
    lines += ["[[PresentationContexts]]", ""]
    for r in rows:
        lines += ["[PC%s]" % r[0], "PresentationContext1 = %s\\TS%s" % (SC_IMAGE_STORAGE, r[0]), ""]
    lines += ["[[Profiles]]", ""]
    for r in rows:
        lines += ["[F%s]" % r[0], "PresentationContexts = PC%s" % r[0], ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def read_manifest(path):
    keys = ("n", "path", "ts", "kind", "uid", "sha", "len", "name")
    with open(path) as f:
        return [dict(zip(keys, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


# -------------------------------------------------------------------- scp


def scp(port, out, ae_title, syntaxes_tsv, extra):
    import logging

    from pynetdicom import AE, evt

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    uids = [u for u, _ in read_syntaxes(syntaxes_tsv)] + extra
    register_uids(uids)
    os.makedirs(out, exist_ok=True)
    lock = threading.Lock()
    count = [0]
    index = open(os.path.join(out, "received.tsv"), "a")

    def on_store(event):
        raw = event.request.DataSet.getvalue()
        ts = str(event.context.transfer_syntax)
        with lock:
            count[0] += 1
            n = count[0]
            with open(os.path.join(out, "%d.ds" % n), "wb") as f:
                f.write(raw)
            index.write(
                "\t".join(
                    (
                        str(n),
                        event.assoc.requestor.ae_title,
                        str(event.request.AffectedSOPClassUID),
                        str(event.request.AffectedSOPInstanceUID),
                        ts,
                        hashlib.sha256(raw).hexdigest(),
                        str(len(raw)),
                    )
                )
                + "\n"
            )
            index.flush()
        return 0x0000

    def on_accepted(event):
        acc = ["%s" % cx.transfer_syntax[0] for cx in event.assoc.accepted_contexts]
        print("scp: association from %s accepted, syntaxes %s" % (event.assoc.requestor.ae_title, acc), flush=True)

    ae = AE(ae_title=ae_title)
    ae.maximum_associations = 20
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    # One context per SOP class; 128 contexts per AE at most, one is enough here.
    ae.add_supported_context(SC_IMAGE_STORAGE, uids)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("scp: %s listening on 127.0.0.1:%d, %d transfer syntaxes" % (ae_title, port, len(uids)), flush=True)
    ae.start_server(
        ("127.0.0.1", port),
        block=True,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_accepted)],
    )


def read_received(d):
    p = os.path.join(d, "received.tsv")
    keys = ("n", "calling", "sop_class", "uid", "ts", "sha", "len")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [dict(zip(keys, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


# ------------------------------------------------------------------- send


def send(host, port, called, calling, results, paths):
    import logging

    from pydicom.uid import UID
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = []
    for p in paths:
        meta, _ = split_dataset(p)
        metas.append((p, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    register_uids({ts for _, _, ts in metas})
    ok = 0
    with open(results, "a") as out:
        for p, sop_class, ts in metas:
            ae = AE(ae_title=calling)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            ae.add_requested_context(sop_class, [ts])
            result, detail = "error", ""
            try:
                assoc = ae.associate(host, port, ae_title=called)
                mine = [cx for cx in assoc.accepted_contexts if cx.transfer_syntax[0] == UID(ts)]
                if assoc.is_rejected:
                    result = "rejected"
                elif not mine and assoc.rejected_contexts:
                    # An A-ASSOCIATE-AC with our one context rejected (pynetdicom then aborts:
                    # nothing to send on).
                    result = "no context"
                    detail = "the acceptor rejected the context: " + ", ".join(
                        "result %s (%s)" % (cx.result, CONTEXT_RESULT.get(cx.result, "?")) for cx in assoc.rejected_contexts
                    )
                    if assoc.is_established:
                        assoc.release()
                elif not assoc.is_established:
                    result = "aborted"
                    detail = "association failed or aborted"
                elif not mine:
                    result = "no context"
                    detail = "accepted contexts: %s" % ", ".join(str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts)
                    assoc.release()
                else:
                    st = assoc.send_c_store(p)
                    code = st.get("Status") if st else None
                    if code == 0x0000:
                        result = "stored"
                        ok += 1
                    elif code is None:
                        result, detail = "aborted", "no response"
                    else:
                        result = "status 0x%04X" % code
                        detail = str(st.get("ErrorComment", ""))
                    if assoc.is_established:
                        assoc.release()
            except Exception as exc:  # noqa: BLE001 - report and go on
                detail = "%s: %s" % (type(exc).__name__, exc)
            finally:
                ae.shutdown()
            out.write("%s\t%s\t%s\n" % (p, result, detail.replace("\t", " ").replace("\n", " ")))
            out.flush()
    print("send: pynetdicom %d/%d stored (%s:%d %s)" % (ok, len(metas), host, port, called))


def dcmtk_proposal(text):
    """What the acceptor answered to storescu's one presentation context, from its -d log."""
    ac = re.search(r"BEGIN A-ASSOCIATE-AC(.*?)END A-ASSOCIATE-AC", text, re.S)
    if not ac:
        return "rejected" if "Association Rejected" in text else "no answer"
    m = re.search(r"Context ID:\s+\d+ \(([^)]*)\)", ac.group(1))
    if not m:
        return "no context in the answer"
    if m.group(1) == "Accepted":
        ts = re.search(r"Accepted Transfer Syntax:\s*=?(\S+)", ac.group(1))
        # The one syntax proposed (DCMTK names the ones it knows: =JPEGBaseline...).
        return "accepted %s" % (ts.group(1) if ts else "?")
    return m.group(1)


def dcmtk_result(log_path):
    """One storescu run (one file, one association): (verdict, detail, what the acceptor
    answered to the proposal), from its -d log."""
    with open(log_path, errors="replace") as f:
        text = f.read()
    prop = dcmtk_proposal(text)
    i = text.find("Received Store Response")
    if i >= 0:
        # -d: the response's dump follows ("DIMSE Status : 0x0000: Success").
        st = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})(?::\s*(.*))?", text[i:])
        if st and st.group(1) == "0000":
            return "stored", "", prop
        return ("status 0x%s" % st.group(1).upper()) if st else "status ?", (st.group(2) or "") if st else "", prop
    for pat, word in (
        (r"Association Rejected", "rejected"),
        (r"No presentation context for|No Acceptable Presentation Contexts", "no context"),
        # DCMTK itself could not read or encode the file: nothing was sent.
        (r"Unsupported transfer syntax|Bad DICOM file|Unknown Tag & Data", "error"),
        (r"Association Aborted|Peer Aborted", "aborted"),
    ):
        if re.search(pat, text, re.I):
            return word, first_error(text, pat), prop
    return "error", first_error(text, r"^[EF]:"), prop


def first_error(text, pat):
    for line in text.splitlines():
        if re.search(pat, line, re.I):
            return line.strip()
    for line in text.splitlines():
        if line.startswith(("E:", "F:")):
            return line.strip()
    return ""


def dcmtk_results(manifest, log_prefix, out_tsv):
    """Verdicts of the storescu runs LOG_PREFIX<n>.log that exist, one per manifest file."""
    with open(out_tsv, "w") as out:
        for m in read_manifest(manifest):
            log = "%s%s.log" % (log_prefix, m["n"])
            if os.path.exists(log):
                r, d, prop = dcmtk_result(log)
                out.write("%s\t%s\t%s\t%s\n" % (m["path"], r, d.replace("\t", " "), prop))


def read_results(path):
    res = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    p, r, d = (line.rstrip("\n").split("\t") + ["", ""])[:3]
                    res[p] = (r, d)
    return res


def read_proposals(path):
    """{path: what the acceptor answered to storescu's proposal} of a dcmtk-results file."""
    res = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    cols = line.rstrip("\n").split("\t") + ["", "", ""]
                    res[cols[0]] = cols[3]
    return res


# ------------------------------------------------------------------- pick


def ds_bytes(path):
    """The data set bytes of a Part 10 file (after the file meta group)."""
    from pynetdicom.dsutils import split_dataset

    _, off = split_dataset(path)
    with open(path, "rb") as f:
        f.seek(off)
        return f.read()


def pick(manifest, ref_dir, dcmtk_results, py_results, out_tsv):
    rows = read_manifest(manifest)
    recv = defaultdict(list)
    for r in read_received(ref_dir):
        recv[(r["calling"], r["uid"])].append(r)
    dres, pres = read_results(dcmtk_results), read_results(py_results)
    table = []
    for m in rows:
        verdict = {}
        for sender, calling, res in (("dcmtk", "SYN_DCMTK", dres), ("pynetdicom", "SYN_PY", pres)):
            r, d = res.get(m["path"], ("not run", ""))
            got = recv[(calling, m["uid"])]
            if r == "stored" and len(got) == 1 and got[0]["ts"] == m["ts"] and got[0]["sha"] == m["sha"]:
                verdict[sender] = "ok"
            elif r == "stored" and len(got) == 1 and got[0]["ts"] == m["ts"]:
                verdict[sender] = "ok, re-encoded"
            elif r == "stored" and got:
                verdict[sender] = "stored as %s x%d" % (",".join(g["ts"] for g in got), len(got))
            else:
                verdict[sender] = r + (" (%s)" % d if d else "")
        if m["kind"] == "negative":
            # The reference SCP accepts it: whoever can send it directly sends it to site A.
            chosen = "dcmtk" if verdict["dcmtk"] == "ok" else ("pynetdicom" if verdict["pynetdicom"] == "ok" else "none")
        elif verdict["dcmtk"] == "ok":
            chosen = "dcmtk"
        elif verdict["pynetdicom"] == "ok":
            chosen = "pynetdicom"
        else:
            chosen = "none"
        table.append((m["n"], m["ts"], m["kind"], chosen, verdict["dcmtk"], verdict["pynetdicom"], m["name"]))
    with open(out_tsv, "w") as f:
        for t in table:
            f.write("\t".join(t) + "\n")
    for t in table:
        print("%-3s %-26s %-8s via %-10s  dcmtk: %-62s pynetdicom: %s" % (t[0], t[1], t[2], t[3], t[4][:62], t[5][:60]))


def read_senders(path):
    keys = ("n", "ts", "kind", "sender", "dcmtk", "pynetdicom", "name")
    with open(path) as f:
        return {r["n"]: r for r in (dict(zip(keys, line.rstrip("\n").split("\t"))) for line in f if line.strip())}


# ------------------------------------------------------------------ check


def inflate(raw):
    try:
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        return d.decompress(raw) + d.flush()
    except zlib.error:
        return None


def checks(rows, senders, res_a, pacs, res_neg, proposals=None):
    """[(ok, text, [details])] of the checks through the gateways."""
    out = []
    listed = [m for m in rows if m["kind"] == "listed"]
    negative = [m for m in rows if m["kind"] == "negative"]
    recv = defaultdict(list)
    for r in pacs:
        recv[r["uid"]].append(r)

    # Every listed syntax had a sender that delivers it directly (else nothing is proven for it).
    nosender = [m for m in listed if senders[m["n"]]["sender"] == "none"]
    out.append(
        (
            not nosender,
            "every one of the %d listed syntaxes has an independent sender that stores it directly, unchanged"
            % len(listed),
            ["no sender: %s (%s)" % (m["ts"], m["name"]) for m in nosender],
        )
    )

    # Acknowledged by site A.
    bad = [(m, res_a.get(m["path"], ("not sent", ""))) for m in listed]
    bad = [(m, r) for m, r in bad if r[0] != "stored"]
    out.append(
        (
            not bad,
            "site A acknowledged (0x0000) all %d listed syntaxes" % len(listed),
            ["%s (%s) via %s: %s %s" % (m["ts"], m["name"], senders[m["n"]]["sender"], r[0], r[1]) for m, r in bad],
        )
    )

    # storescu proposing each listed syntax, on its own association: site A accepted it.
    if proposals:
        bad = [m for m in listed if not proposals.get(m["path"], "").startswith("accepted ")]
        sent = [m for m in listed if senders[m["n"]]["sender"] == "dcmtk"]
        out.append(
            (
                not bad,
                "site A accepted storescu's proposal of each of the %d listed syntaxes (%d then stored by storescu; "
                "%d proposed only, DCMTK cannot encode them, and sent by pynetdicom)" % (len(listed), len(sent), len(listed) - len(sent)),
                ["%s (%s): %s" % (m["ts"], m["name"], proposals.get(m["path"], "not proposed")) for m in bad],
            )
        )

    # Arrived exactly once.
    bad = [m for m in listed if len(recv[m["uid"]]) != 1]
    out.append(
        (
            not bad,
            "every listed syntax's object arrived at the PACS exactly once",
            ["%s (%s): arrived %d times" % (m["ts"], m["name"], len(recv[m["uid"]])) for m in bad],
        )
    )

    # Same negotiated transfer syntax at the last hop.
    bad = [(m, [g["ts"] for g in recv[m["uid"]]]) for m in listed if recv[m["uid"]]]
    bad = [(m, t) for m, t in bad if any(x != m["ts"] for x in t)]
    out.append(
        (
            not bad,
            "the PACS negotiated each object's own transfer syntax (nothing transcoded)",
            ["%s (%s): negotiated %s" % (m["ts"], m["name"], ",".join(t)) for m, t in bad],
        )
    )

    # Byte for byte: the data set as in the file (SHA-256 after the file meta).
    bad = []
    for m in listed:
        got = recv[m["uid"]]
        if not got or all(g["sha"] == m["sha"] for g in got):
            continue  # missing ones are reported above
        for g in got:
            if g["sha"] == m["sha"]:
                continue
            why = "data set differs (sha %s.., %s bytes; sent %s.., %s bytes)" % (g["sha"][:12], g["len"], m["sha"][:12], m["len"])
            if m["ts"] in DEFLATED:
                sent = inflate(ds_bytes(m["path"]))
                with open(os.path.join(g["_dir"], "%s.ds" % g["n"]), "rb") as f:
                    a = inflate(f.read())
                if a is not None and sent is not None and a.rstrip(b"\0") == sent.rstrip(b"\0"):
                    why += "; the inflated data sets are identical (re-deflated on the way)"
                else:
                    why += "; the inflated data sets differ too"
            bad.append("%s (%s): %s" % (m["ts"], m["name"], why))
    out.append((not bad, "every data set arrived byte for byte as in the sent file (SHA-256 after the file meta)", bad))

    # Negative control: refused by site A, never at the PACS (which would take it). Sent by
    # a sender that stores it directly; storescu (which cannot send it) proposes it too.
    def refused(r):
        return r[0] in ("no context", "rejected") or (r[0].startswith("status 0x") and r[0] != "status 0x0000")

    for m in negative:
        r = res_a.get(m["path"], ("not sent", ""))
        s = senders[m["n"]]
        rd = res_neg.get(m["path"])
        prop = (proposals or {}).get(m["path"], "")
        ok = refused(r) and (rd is None or refused(rd)) and not prop.startswith("accepted")
        ok = ok and s["sender"] != "none" and not recv[m["uid"]]
        out.append(
            (
                ok,
                "negative control %s: refused by site A when %s sent it (%s: %s)%s, never at the PACS (%d arrivals)"
                % (
                    m["ts"],
                    s["sender"],
                    r[0],
                    r[1] or "-",
                    "" if rd is None else " and when storescu proposed it (%s: %s)" % (rd[0], prop or "-"),
                    len(recv[m["uid"]]),
                ),
                [] if ok else ["%s direct: %s" % (s["sender"], s[s["sender"]] if s["sender"] in s else "-")],
            )
        )
    return out


def load(manifest, senders_tsv, results_a, pacs_dir, results_propose):
    rows = read_manifest(manifest)
    senders = read_senders(senders_tsv)
    res_a = read_results(results_a)
    pacs = read_received(pacs_dir)
    for r in pacs:
        r["_dir"] = pacs_dir
    proposals = dict(read_proposals(results_a), **read_proposals(results_propose))
    return rows, senders, res_a, pacs, read_results(results_propose), proposals


def check(manifest, senders_tsv, results_a, pacs_dir, results_neg):
    rows, senders, res_a, pacs, res_neg, props = load(manifest, senders_tsv, results_a, pacs_dir, results_neg)
    failed = 0
    for ok, text, details in checks(rows, senders, res_a, pacs, res_neg, props):
        print("%s\t%s" % ("PASS" if ok else "FAIL", text))
        for d in details[:80]:
            print("DETAIL\t%s" % d)
        failed += not ok
    return 1 if failed else 0


def self_test(manifest, senders_tsv, results_a, pacs_dir, results_neg):
    """Doctor a copy of the PACS output (and of site A's results) in each way the checks
    exist to catch; each doctored copy must fail the check it targets (and the original
    must pass all of them)."""
    rows, senders, res_a, pacs, res_neg, props = load(manifest, senders_tsv, results_a, pacs_dir, results_neg)
    base = checks(rows, senders, res_a, pacs, res_neg, props)
    listed = [m for m in rows if m["kind"] == "listed"]
    negative = [m for m in rows if m["kind"] == "negative"]
    tmp = tempfile.mkdtemp(prefix="syntaxes-selftest-")
    failures = 0
    try:
        if not all(ok for ok, _, _ in base):
            print("self-test: the undoctored run does not pass, cannot self-test")
            return 1
        by_uid = {r["uid"]: r for r in pacs}
        defl = next(m for m in listed if m["ts"] in DEFLATED)
        plain = next(m for m in listed if m["ts"] not in DEFLATED)

        def changed_copy(m, mutate):
            r = dict(by_uid[m["uid"]])
            with open(os.path.join(pacs_dir, "%s.ds" % r["n"]), "rb") as f:
                raw = mutate(f.read())
            r["n"] = "doctored-%s" % m["n"]
            r["_dir"] = tmp
            with open(os.path.join(tmp, "%s.ds" % r["n"]), "wb") as f:
                f.write(raw)
            r["sha"], r["len"] = hashlib.sha256(raw).hexdigest(), str(len(raw))
            return [x for x in pacs if x["uid"] != m["uid"]] + [r]

        def flip(raw):
            b = bytearray(raw)
            b[len(b) // 2] ^= 0x01
            return bytes(b)

        def redeflate(raw):
            c = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
            d = inflate(raw)
            out = c.compress(d) + c.flush()
            return out + (b"\0" if len(out) % 2 else b"")

        cases = [
            ("one byte changed in the %s data set" % plain["ts"], "byte for byte", res_a, changed_copy(plain, flip)),
            ("the %s data set re-deflated (level 1)" % defl["ts"], "byte for byte", res_a, changed_copy(defl, redeflate)),
            ("the %s object missing" % plain["ts"], "exactly once", res_a, [x for x in pacs if x["uid"] != plain["uid"]]),
            ("the %s object twice" % plain["ts"], "exactly once", res_a, pacs + [dict(by_uid[plain["uid"]])]),
            (
                "the %s object negotiated as explicit VR LE" % plain["ts"],
                "own transfer syntax",
                res_a,
                [dict(x, ts=EXPLICIT_LE) if x["uid"] == plain["uid"] else x for x in pacs],
            ),
            ("site A answered 0xA700 for %s" % plain["ts"], "acknowledged", dict(res_a, **{plain["path"]: ("status 0xA700", "")}), pacs),
        ]
        if negative:
            n = negative[0]
            leaked = dict(by_uid[plain["uid"]], uid=n["uid"], ts=n["ts"])
            cases.append(("the negative control %s at the PACS" % n["ts"], "negative control", res_a, pacs + [leaked]))
            cases.append(
                ("the negative control %s acknowledged by site A" % n["ts"], "negative control", dict(res_a, **{n["path"]: ("stored", "")}), pacs)
            )
            if n["path"] in res_neg:
                cases.append(
                    (
                        "storescu's proposal of %s accepted by site A" % n["ts"],
                        "negative control",
                        res_a,
                        pacs,
                        dict(res_neg, **{n["path"]: ("stored", "")}),
                        dict(props, **{n["path"]: "accepted %s" % n["ts"]}),
                    )
                )
        if props:
            cases.append(
                (
                    "storescu's proposal of %s rejected by site A" % plain["ts"],
                    "proposal",
                    res_a,
                    pacs,
                    res_neg,
                    dict(props, **{plain["path"]: "Transfer Syntaxes Not Supported"}),
                )
            )
        for what, target, ra, pc, *rn in cases:
            res = checks(rows, senders, ra, pc, *(rn or [res_neg, props]))
            hit = [text for ok, text, _ in res if not ok]
            if any(target in t for t in hit):
                print("self-test: %s -> caught (%s)" % (what, "; ".join(t[:60] for t in hit)))
            else:
                failures += 1
                print("self-test: %s -> NOT caught" % what)
        print("self-test: %d of %d doctored runs caught" % (len(cases) - failures, len(cases)))
        return 1 if failures else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gw(status_file, dest):
    """"queued in_flight dead delivered" of one destination in `status --json`."""
    with open(status_file) as f:
        st = json.load(f)
    d = [x for x in st["destinations"] if x["name"] == dest][0]
    print(d["queued"], d["in_flight"], d["dead"], d["delivered"])


# ------------------------------------------------------------------- main


def main(argv):
    warnings.simplefilter("ignore")
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "parse":
        for row in parse(args[0]):
            print("\t".join(row))
    elif cmd == "gen":
        negs = [args[i + 1] for i, a in enumerate(args) if a == "--negative"]
        gen(args[0], args[1], negs)
    elif cmd == "scp":
        extra = [args[i + 1] for i, a in enumerate(args) if a == "--extra"]
        scp(int(args[0]), args[1], args[2], args[3], extra)
    elif cmd == "send":
        send(args[0], int(args[1]), args[2], args[3], args[4], args[5:])
    elif cmd == "dcmtk-results":
        dcmtk_results(args[0], args[1], args[2])
    elif cmd == "gw":
        gw(args[0], args[1])
    elif cmd == "pick":
        pick(*args[:5])
    elif cmd == "check":
        return check(*args[:5])
    elif cmd == "self-test":
        return self_test(*args[:5])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
