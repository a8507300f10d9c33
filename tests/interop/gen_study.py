#!/usr/bin/env python3
"""Prepare the inputs of the interop test in a work directory.

    gen_study.py OUT_DIR [--count 300] [--series 4]

Writes, all under OUT_DIR (never into the repository):

  study/*.dcm         a generated CT-like study: one StudyInstanceUID, a few
                      series, explicit VR little endian, random 16-bit pixels,
                      fresh UIDs on every run, patient INTEROP^MARKER
  pydicom/*.dcm       copies of pydicom's own test files that pydicom reads
                      with a file meta and that carry SOPClassUID,
                      SOPInstanceUID and a TransferSyntaxUID
  manifest.tsv        one line per input: path, SOP class (file meta),
                      transfer syntax, SOP instance UID, source
  markers.json        strings/bytes from the sent data that must never show
                      up in the gateways' data directories
  storescu.cfg        a DCMTK association profile file: one presentation
                      context per (SOP class, transfer syntax) pair found in
                      the inputs, each with that single transfer syntax, so
                      that storescu sends every file in its own transfer
                      syntax and never converts; profiles GROUP1, GROUP2, ...
                      of at most 128 contexts each
  storescu-GROUPn.txt the input files to send with profile GROUPn
"""

import argparse
import json
import os
import shutil
import sys
import warnings

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT_NAME = "INTEROP^MARKER"
MAX_CONTEXTS = 128


def pydicom_major():
    try:
        return int(pydicom.__version__.split(".")[0])
    except ValueError:
        return 3


def write_file(ds, path):
    if pydicom_major() >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.save_as(path, write_like_original=False)


def gen_study(out_dir, count, nseries):
    """Generate `count` CT objects in `nseries` series; return markers."""
    os.makedirs(out_dir, exist_ok=True)
    study_uid = generate_uid()
    frame_uid = generate_uid()
    patient_id = "INTEROP-" + generate_uid().rsplit(".", 1)[-1][-12:]
    accession = "IOP" + os.urandom(4).hex().upper()
    series = []
    for s in range(nseries):
        # alternate image sizes between series: 128x128, 64x64, ...
        size = 128 if s % 2 == 0 else 64
        series.append((generate_uid(), s + 1, size))
    files = []
    sop_uids = []
    pixel_chunk = None
    for i in range(count):
        series_uid, series_no, size = series[i % nseries]
        inst_no = i // nseries + 1
        sop_uid = generate_uid()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = "20240102"
        ds.SeriesDate = "20240102"
        ds.StudyTime = "101500"
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = "INTEROP TEST"
        ds.ReferringPhysicianName = "INTEROP^REFERRER"
        ds.StudyDescription = "INTEROP MARKER STUDY"
        ds.SeriesDescription = "INTEROP SERIES %d" % series_no
        ds.PatientName = PATIENT_NAME
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.SliceThickness = "2.5"
        ds.KVP = "120"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_no
        ds.InstanceNumber = inst_no
        z = -2.5 * inst_no
        ds.ImagePositionPatient = [-160, -160, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.SliceLocation = z
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.PixelSpacing = [320.0 / size, 320.0 / size]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        pixels = os.urandom(size * size * 2)
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        if pixel_chunk is None:
            pixel_chunk = pixels[1000:1032]

        path = os.path.join(out_dir, "ser%d_img%04d.dcm" % (series_no, inst_no))
        write_file(ds, path)
        files.append((path, CT_IMAGE_STORAGE, str(ExplicitVRLittleEndian), sop_uid))
        sop_uids.append(sop_uid)

    markers = {
        "patient_name": PATIENT_NAME,
        "patient_id": patient_id,
        "accession_number": accession,
        "study_uid": study_uid,
        "series_uid": series[0][0],
        "generated_sop_uids": [sop_uids[0], sop_uids[-1]],
        "pixel_chunk_hex": pixel_chunk.hex(),
    }
    return files, markers


def pydicom_test_files():
    base = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
    for root, dirs, names in os.walk(base):
        dirs.sort()
        for name in sorted(names):
            if name.lower().endswith(".dcm"):
                yield base, os.path.join(root, name)


def select_pydicom(out_dir):
    """Copy the usable pydicom test files; return (files, skipped)."""
    os.makedirs(out_dir, exist_ok=True)
    files, skipped = [], []
    for base, path in pydicom_test_files():
        rel = os.path.relpath(path, base)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)  # no force: needs a preamble/meta
        except Exception as exc:  # noqa: BLE001 - any reader error: skip
            skipped.append((rel, "unreadable: %s" % type(exc).__name__))
            continue
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        sop_class = ds.get("SOPClassUID")
        sop_inst = ds.get("SOPInstanceUID")
        meta_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
        if not meta or not ts or not sop_class or not sop_inst:
            skipped.append((rel, "no file meta / SOP class / SOP instance / TS"))
            continue
        if meta_class and str(meta_class) != str(sop_class):
            skipped.append((rel, "meta SOP class differs from data set"))
            continue
        dest = os.path.join(out_dir, rel.replace(os.sep, "__"))
        shutil.copyfile(path, dest)
        files.append((dest, str(sop_class), str(ts), str(sop_inst)))
    return files, skipped


def write_storescu_profiles(out_dir, entries):
    """Write storescu.cfg and storescu-GROUPn.txt; return the group count."""
    pairs = []
    for _path, sop_class, ts, _inst, _src in entries:
        if (sop_class, ts) not in pairs:
            pairs.append((sop_class, ts))
    pairs.sort()
    groups = [pairs[i : i + MAX_CONTEXTS] for i in range(0, len(pairs), MAX_CONTEXTS)]
    tss = sorted({ts for _, ts in pairs})
    ts_key = {ts: "TS%d" % (i + 1) for i, ts in enumerate(tss)}
    lines = ["# generated by tests/interop/gen_study.py", "[[TransferSyntaxes]]", ""]
    for ts in tss:
        lines += ["[%s]" % ts_key[ts], "TransferSyntax1 = %s" % ts, ""]
    lines += ["[[PresentationContexts]]", ""]
    for g, group in enumerate(groups, 1):
        lines.append("[PCGROUP%d]" % g)
        for n, (sop_class, ts) in enumerate(group, 1):
            lines.append("PresentationContext%d = %s\\%s" % (n, sop_class, ts_key[ts]))
        lines.append("")
    lines += ["[[Profiles]]", ""]
    for g in range(1, len(groups) + 1):
        lines += ["[GROUP%d]" % g, "PresentationContexts = PCGROUP%d" % g, ""]
    with open(os.path.join(out_dir, "storescu.cfg"), "w") as f:
        f.write("\n".join(lines))
    for g, group in enumerate(groups, 1):
        wanted = set(group)
        with open(os.path.join(out_dir, "storescu-GROUP%d.txt" % g), "w") as f:
            for path, sop_class, ts, _inst, _src in entries:
                if (sop_class, ts) in wanted:
                    f.write(path + "\n")
    return len(groups), len(pairs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--series", type=int, default=4)
    args = ap.parse_args()

    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    study, markers = gen_study(os.path.join(out, "study"), args.count, args.series)
    pyd, skipped = select_pydicom(os.path.join(out, "pydicom"))

    by_name = {os.path.basename(p).split("__")[-1]: inst for p, _, _, inst in pyd}
    markers["pydicom_sop_uids"] = [
        by_name[n] for n in ("CT_small.dcm", "MR_small.dcm") if n in by_name
    ]

    entries = [e + ("study",) for e in study] + [e + ("pydicom",) for e in pyd]
    with open(os.path.join(out, "manifest.tsv"), "w") as f:
        for e in entries:
            f.write("\t".join(e) + "\n")
    with open(os.path.join(out, "markers.json"), "w") as f:
        json.dump(markers, f, indent=2)
    ngroups, npairs = write_storescu_profiles(out, entries)

    print(
        "gen_study: %d generated objects (study %s), %d pydicom test files "
        "(%d skipped), %d (SOP class, transfer syntax) pairs in %d storescu profile(s)"
        % (len(study), markers["study_uid"], len(pyd), len(skipped), npairs, ngroups)
    )
    for rel, why in skipped:
        print("gen_study:   skipped pydicom %s: %s" % (rel, why))
    if not markers["pydicom_sop_uids"]:
        print("gen_study: warning: CT_small.dcm/MR_small.dcm not found", file=sys.stderr)


if __name__ == "__main__":
    main()
