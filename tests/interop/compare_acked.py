#!/usr/bin/env python3
"""Compare what reached storescp with what crash_sender.py sent and had acknowledged.

    compare_acked.py WORKDIR [RECEIVED_DIR]

WORKDIR holds send/ (the Part-10 files sent), acked.tsv (SOP Instance UID and SHA-256 of
the data set of each acknowledged object) and pacs/ (storescp's output; or RECEIVED_DIR, e.g. a hand-off folder). Data sets are
compared by the SHA-256 of their bytes after the file meta. Prints one line:
`ACKED SENT LOST CORRUPTED DUPLICATES`, where LOST counts acknowledged objects that never
arrived, CORRUPTED files whose data set matches nothing sent, and DUPLICATES extra
identical copies.
"""
import hashlib, os, sys
work = sys.argv[1]
count = len(os.listdir(os.path.join(work, "send")))
sent = {}
for name in os.listdir(os.path.join(work, "send")):
    data = open(os.path.join(work, "send", name), "rb").read()
    n = int.from_bytes(data[140:144], "little")
    sent[hashlib.sha256(data[144 + n:]).hexdigest()] = name
acked = [l.split("\t")[1].strip() for l in open(os.path.join(work, "acked.tsv")) if l.strip()]
got = {}
received = sys.argv[2] if len(sys.argv) > 2 else os.path.join(work, "pacs")
for root, _, files in os.walk(received):
    for f in files:
        data = open(os.path.join(root, f), "rb").read()
        if data[128:132] != b"DICM":
            continue
        n = int.from_bytes(data[140:144], "little")
        h = hashlib.sha256(data[144 + n:]).hexdigest()
        got[h] = got.get(h, 0) + 1
lost = [h for h in set(acked) if h not in got]
corrupt = [h for h in got if h not in sent]
dups = sum(c - 1 for c in got.values())
print(len(set(acked)), count, len(lost), len(corrupt), dups)
