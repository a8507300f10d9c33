#!/usr/bin/env python3
"""Send DICOM files to a Storage SCP with pynetdicom, in their own transfer syntax.

    send_pynetdicom.py HOST PORT [--called-ae AE] [--calling-ae AE]
                       [--max-contexts N] [--as-is] (--file-list FILE | FILE...)

Files are grouped by their (SOP class, transfer syntax) pair (SOP class from
the data set, transfer syntax from the file meta). Each association requests one presentation context per pair
(with that single transfer syntax) and carries at most --max-contexts of them
(128 is the protocol's limit), so several associations are used when needed.
Files are sent from disk as they are (pynetdicom's chunked mode: the data set
bytes after the file meta go on the wire unchanged, nothing is decoded or
transcoded; see read_pairs() for the two exceptions). A failed store or association is reported and the rest goes on.
Prints a closing line `pynetdicom: X/Y stored ...`; exits 0 only if every file
was stored with status Success.
"""

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode, split_dataset

# Send the file's bytes rather than a re-encoded pydicom Dataset.
_config.STORE_SEND_CHUNKED_DATASET = True


def fixed_meta_copy(path, meta, offset, sop_class, sop_inst, tmpdir):
    """Copy `path` with its file meta's SOP class/instance set to the data set's.

    pynetdicom's file sending takes the C-STORE Affected SOP Class/Instance
    UIDs from the file meta; a few of pydicom's test files have a file meta
    that disagrees with their data set, which would make a non-conformant
    request. The data set bytes are kept unchanged.
    """
    meta = FileMetaDataset(meta)
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_inst
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    with open(path, "rb") as f:
        f.seek(offset)
        data_set = f.read()
    out = os.path.join(tmpdir, "%d-%s" % (len(os.listdir(tmpdir)), os.path.basename(path)))
    with open(out, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + buf.getvalue() + data_set)
    return out


def read_pairs(paths, tmpdir, as_is=False):
    """Return ([(sop class, TS, path, path or Dataset to send)], [(path, why)]).

    Files are sent as they are, from disk, except:
    - a data set of odd byte length cannot go on the wire as it is (PDV
      fragments must have even length, DCMTK aborts the association), so such
      a file is decoded and sent re-encoded by pydicom if that makes it even
      (e.g. a deflated stream without its pad byte), and skipped otherwise;
      with `as_is` it is sent unchanged all the same (a bad object on purpose,
      e.g. pydicom's rtplan_truncated.dcm, which ends mid-element);
    - a file whose meta names another SOP class/instance than its data set is
      sent from a copy with a corrected file meta and the same data set bytes.
    """
    items, bad = [], []
    for p in paths:
        try:
            meta, offset = split_dataset(Path(p))
            ts = meta.TransferSyntaxUID
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ids = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            sop_class = str(ids.SOPClassUID)
            sop_inst = str(ids.SOPInstanceUID)
        except Exception as exc:  # noqa: BLE001 - report and go on
            bad.append((p, "cannot read file meta or SOP class/instance: %s" % exc))
            continue
        payload = p
        if (Path(p).stat().st_size - offset) % 2 and as_is:
            print("pynetdicom: note: %s has an odd-length data set, sending it as it is (--as-is)" % p)
        elif (Path(p).stat().st_size - offset) % 2:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(p)
                raw = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            except Exception:  # noqa: BLE001
                raw = None
            if raw is None or len(raw) % 2:
                bad.append((p, "odd-length data set, cannot be sent as is"))
                continue
            print("pynetdicom: note: %s has an odd-length data set, sending it re-encoded by pydicom" % p)
            payload = ds
        elif (str(meta.get("MediaStorageSOPClassUID", "")), str(meta.get("MediaStorageSOPInstanceUID", ""))) != (
            sop_class,
            sop_inst,
        ):
            print("pynetdicom: note: %s: file meta SOP class/instance differ from the data set's, fixing the meta" % p)
            payload = fixed_meta_copy(p, meta, offset, sop_class, sop_inst, tmpdir)
        items.append((sop_class, str(ts), p, payload))
    return items, bad


def group(items, max_contexts):
    """Yield lists of items whose distinct (class, TS) pairs fit one association."""
    items = sorted(items, key=lambda it: it[:3])
    cur, pairs = [], set()
    for it in items:
        pair = it[:2]
        if pair not in pairs and len(pairs) >= max_contexts:
            yield cur
            cur, pairs = [], set()
        pairs.add(pair)
        cur.append(it)
    if cur:
        yield cur


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--called-ae", default="ANY-SCP")
    ap.add_argument("--calling-ae", default="PYNETDICOM")
    ap.add_argument("--max-contexts", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=120.0, help="ACSE/DIMSE/network timeout (s)")
    ap.add_argument("--file-list", help="file with one path per line")
    ap.add_argument(
        "--as-is",
        action="store_true",
        help="send odd-length data sets unchanged too (a malformed object, on purpose)",
    )
    ap.add_argument("files", nargs="*")
    args = ap.parse_intermixed_args()
    if not 1 <= args.max_contexts <= 128:
        ap.error("--max-contexts must be 1..128")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("pydicom").setLevel(logging.ERROR)

    paths = list(args.files)
    if args.file_list:
        with open(args.file_list) as f:
            paths += [line.strip() for line in f if line.strip()]
    tmp = tempfile.TemporaryDirectory(prefix="send_pynetdicom-")
    items, bad = read_pairs(paths, tmp.name, args.as_is)

    stored = warned = 0
    failed = list(bad)
    nassoc = 0
    for batch in group(items, args.max_contexts):
        ae = AE(ae_title=args.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
        for sop_class, ts in sorted({it[:2] for it in batch}):
            ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate(args.host, args.port, ae_title=args.called_ae)
        nassoc += 1
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association failed/aborted"
            print("pynetdicom: %s for %d files" % (why, len(batch)))
            failed += [(it[2], why) for it in batch]
            continue
        for n, (_sop_class, _ts, path, payload) in enumerate(batch):
            if not assoc.is_established:
                failed += [(it[2], "association lost") for it in batch[n:]]
                print("pynetdicom: association lost, %d files not sent" % (len(batch) - n))
                break
            try:
                status = assoc.send_c_store(payload, msg_id=(n % 65535) + 1)
            except Exception as exc:  # noqa: BLE001 - report and go on
                failed.append((path, "%s: %s" % (type(exc).__name__, exc)))
                continue
            code = status.get("Status") if status else None
            if code == 0x0000:
                stored += 1
            elif code is not None and (code & 0xF000) == 0xB000:
                warned += 1
                failed.append((path, "warning status 0x%04X" % code))
            else:
                failed.append((path, "status %s" % ("none" if code is None else "0x%04X" % code)))
        if assoc.is_established:
            assoc.release()
        ae.shutdown()

    tmp.cleanup()
    for p, why in failed:
        print("pynetdicom: FAILED %s: %s" % (p, why))
    total = len(paths)
    print(
        "pynetdicom: %d/%d stored (%d failed, %d with warning status) in %d association(s)"
        % (stored, total, len(failed) - warned, warned, nassoc)
    )
    return 0 if stored == total else 1


if __name__ == "__main__":
    sys.exit(main())
