#!/usr/bin/env python3
"""The sender of the crash loop: C-STORE generated objects until every one is acknowledged.

    crash_sender.py HOST PORT CALLED_AE COUNT WORKDIR [SPREAD_SECONDS]

Writes COUNT small CT objects (one study, random pixels, patient CRASH^LOOP) as Part-10
files under WORKDIR/send, then sends them in order with pynetdicom, each file's data set
bytes unchanged on the wire. An object is retried (on a new association if need be) until
the gateway answers Success, so a node killed mid-transfer only delays it. Each
acknowledged object is appended to WORKDIR/acked.tsv (SOP Instance UID, SHA-256 of the data
set) and flushed before the next one starts. Prints `crash_sender: N/N acknowledged`.

SPREAD_SECONDS paces the flow: object i is not sent before i/COUNT of that time has
passed, so the flow lasts at least as long as the crash loop's kills (which must hit a
live flow) however fast the machine sends.
"""

import hashlib
import logging
import os
import sys
import time

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

_config.STORE_SEND_CHUNKED_DATASET = True
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
CT = "1.2.840.10008.5.1.4.1.1.2"


def write_objects(count, out):
    os.makedirs(out, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.PatientName = "CRASH^LOOP"
        ds.PatientID = "CRASH-1"
        ds.Modality = "CT"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 64
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = os.urandom(64 * 64 * 2)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        p = os.path.join(out, "%05d.dcm" % i)
        ds.save_as(p, enforce_file_format=True)
        paths.append((p, ds.SOPInstanceUID))
    return paths


def dataset_sha(path):
    data = open(path, "rb").read()
    meta_len = int.from_bytes(data[140:144], "little")
    return hashlib.sha256(data[144 + meta_len:]).hexdigest()


def main():
    host, port, called, count, work = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    spread = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    paths = write_objects(count, os.path.join(work, "send"))
    ae = AE(ae_title="CRASHSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    assoc = None
    acked = 0
    start = time.monotonic()
    with open(os.path.join(work, "acked.tsv"), "a") as log:
        for i, (path, uid) in enumerate(paths):
            wait = start + spread * i / count - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            while True:
                if assoc is None or not assoc.is_established:
                    assoc = ae.associate(host, port, ae_title=called)
                    if not assoc.is_established:
                        assoc = None
                        time.sleep(0.1)
                        continue
                try:
                    status = assoc.send_c_store(path)
                except Exception:
                    status = None
                if status is not None and getattr(status, "Status", None) == 0:
                    log.write("%s\t%s\n" % (uid, dataset_sha(path)))
                    log.flush()
                    acked += 1
                    break
                if assoc is not None and assoc.is_established:
                    assoc.abort()
                assoc = None
                time.sleep(0.1)
    if assoc is not None and assoc.is_established:
        assoc.release()
    print("crash_sender: %d/%d acknowledged" % (acked, count))


if __name__ == "__main__":
    main()
