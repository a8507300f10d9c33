#!/usr/bin/env python3
"""A Storage SCP that keeps every data set's bytes as they came (pynetdicom).

    raw_scp.py PORT OUT_DIR [--ae-title AE]

Accepts any storage SOP class (every context proposed, pynetdicom's
"unrestricted" mode) in the transfer syntaxes pynetdicom knows, and writes
each received data set, undecoded, as a Part-10 file OUT_DIR/N.dcm (a zero
preamble, "DICM", a file meta group with the command's SOP class and
instance UIDs and the context's transfer syntax, then the data set's bytes).
Unlike DCMTK's storescp it takes a data set that does not parse, such as one
truncated mid-element, or one of odd length: it plays a PACS that has been
fixed (upgraded) to take an object the old one aborted on. Answers Success.
Prints "raw_scp: listening on 127.0.0.1:PORT" once it listens.
"""

import argparse
import logging
import os
import signal
import sys
import threading

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--ae-title", default="STORESCP")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    os.makedirs(args.out, exist_ok=True)
    lock = threading.Lock()
    count = [0]

    def on_store(event):
        raw = event.request.DataSet.getvalue()
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = event.request.AffectedSOPClassUID
        meta.MediaStorageSOPInstanceUID = event.request.AffectedSOPInstanceUID
        meta.TransferSyntaxUID = event.context.transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "RAW_SCP"
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_file_meta_info(buf, meta, enforce_standard=True)
        with lock:
            count[0] += 1
            path = os.path.join(args.out, "%d.dcm" % count[0])
        tmp = path + ".partial"
        with open(tmp, "wb") as f:
            f.write(b"\0" * 128 + b"DICM" + buf.getvalue() + raw)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        return 0x0000

    ae = AE(ae_title=args.ae_title)
    ae.require_called_aet = False
    ae.maximum_associations = 10
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    # Any SOP class the requestor proposes (SCP role for storage).
    ae.add_supported_context(Verification)
    from pynetdicom import AllStoragePresentationContexts

    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = ae.start_server(
        ("127.0.0.1", args.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    print("raw_scp: listening on 127.0.0.1:%d" % args.port, flush=True)
    try:
        threading.Event().wait()
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
