#!/usr/bin/env python3
"""Compare what a DICOM receiver got directly with what it got through the gateways.

    compare.py DIRECT_DIR GATEWAY_DIR
        Every file is a DICOM Part-10 file as written by storescp. For each
        one the SHA-256 of the data set bytes only is computed: the 128-byte
        preamble, "DICM" and the whole group-0002 file meta (its length is
        (0002,0000)) are skipped, since the meta legitimately differs (source
        AE title, implementation UID, ...). The two directories are compared
        as multisets of data set hashes: every data set that arrived directly
        must arrive through the gateways exactly as many times. Missing ones
        are failures, and so are extras (duplicates). For every matched pair
        the transfer syntax (0002,0010) and SOP class (0002,0002) must agree.
        Exit 0 if identical, 1 if not, 2 on usage errors.

    compare.py --self-test DIR
        Check that the comparison detects a changed data set, a missing file,
        an extra file, a changed transfer syntax and a changed SOP class, on
        altered copies of DIR (made in a temporary directory), and that DIR
        equals itself.

    compare.py --scan MARKERS_JSON --present DIR... --absent DIR...
        Byte-wise search of every regular file under the given directories for
        the markers in MARKERS_JSON (all string values, plus pixel_chunk_hex as
        raw bytes). Every marker must occur somewhere under the --present
        directories (positive control) and nowhere under the --absent ones.
"""

import collections
import hashlib
import json
import os
import shutil
import sys
import tempfile

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

TS_NAMES = {
    "1.2.840.10008.1.2": "ImplicitLE",
    "1.2.840.10008.1.2.1": "ExplicitLE",
    "1.2.840.10008.1.2.1.99": "DeflatedExplicitLE",
    "1.2.840.10008.1.2.2": "ExplicitBE",
    "1.2.840.10008.1.2.4.50": "JPEGBaseline",
    "1.2.840.10008.1.2.4.51": "JPEGExtended",
    "1.2.840.10008.1.2.4.57": "JPEGLossless",
    "1.2.840.10008.1.2.4.70": "JPEGLosslessSV1",
    "1.2.840.10008.1.2.4.80": "JPEGLSLossless",
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless",
    "1.2.840.10008.1.2.4.90": "JPEG2000Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG2000",
    "1.2.840.10008.1.2.5": "RLELossless",
}


class ParseError(Exception):
    pass


class MetaElement:
    __slots__ = ("tag", "vr", "value_offset", "length")

    def __init__(self, tag, vr, value_offset, length):
        self.tag, self.vr, self.value_offset, self.length = tag, vr, value_offset, length


def parse_meta(data):
    """Return (elements by tag, offset of the data set) of a Part-10 file."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ParseError("no DICM prefix")
    pos = 132
    elems = {}
    group_end = None
    while pos + 8 <= len(data):
        group = int.from_bytes(data[pos : pos + 2], "little")
        if group != 0x0002:
            break
        elem = int.from_bytes(data[pos + 2 : pos + 4], "little")
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            if pos + 12 > len(data):
                raise ParseError("truncated file meta")
            length = int.from_bytes(data[pos + 8 : pos + 12], "little")
            value = pos + 12
        else:
            length = int.from_bytes(data[pos + 6 : pos + 8], "little")
            value = pos + 8
        if length == 0xFFFFFFFF or value + length > len(data):
            raise ParseError("bad length in file meta element (0002,%04X)" % elem)
        tag = (group << 16) | elem
        elems[tag] = MetaElement(tag, vr, value, length)
        if tag == 0x00020000 and length == 4:
            group_end = value + 4 + int.from_bytes(data[value : value + 4], "little")
        pos = value + length
        if group_end is not None and pos >= group_end:
            break
    if group_end is not None:
        if group_end != pos:
            raise ParseError(
                "(0002,0000) says meta ends at %d, elements end at %d" % (group_end, pos)
            )
        return elems, group_end
    return elems, pos


def meta_str(data, elems, tag):
    e = elems.get(tag)
    if e is None:
        return ""
    return data[e.value_offset : e.value_offset + e.length].rstrip(b"\0 ").decode("ascii", "replace")


class Entry:
    __slots__ = ("name", "digest", "ts", "sop_class", "sop_inst", "size")

    def __init__(self, name, digest, ts, sop_class, sop_inst, size):
        self.name, self.digest, self.ts = name, digest, ts
        self.sop_class, self.sop_inst, self.size = sop_class, sop_inst, size

    def describe(self):
        return "%s (SOP instance %s, SOP class %s, TS %s %s, data set %d bytes)" % (
            self.name,
            self.sop_inst or "?",
            self.sop_class or "?",
            self.ts or "?",
            TS_NAMES.get(self.ts, ""),
            self.size,
        )


def load_dir(path):
    """Return (entries, unreadable[(name, reason)]) for every file under path."""
    entries, bad = [], []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            try:
                with open(full, "rb") as f:
                    data = f.read()
                elems, ds_off = parse_meta(data)
            except (OSError, ParseError) as exc:
                bad.append((rel, str(exc)))
                continue
            entries.append(
                Entry(
                    rel,
                    hashlib.sha256(data[ds_off:]).hexdigest(),
                    meta_str(data, elems, 0x00020010),
                    meta_str(data, elems, 0x00020002),
                    meta_str(data, elems, 0x00020003),
                    len(data) - ds_off,
                )
            )
    return entries, bad


class Result:
    def __init__(self):
        self.matched = 0
        self.missing = []  # Entry from direct
        self.extra = []  # Entry from gateway
        self.meta_mismatch = []  # (direct Entry, gateway Entry, what)
        self.unreadable = []  # (side, name, reason)

    @property
    def ok(self):
        return not (self.missing or self.extra or self.meta_mismatch or self.unreadable)


def compare_dirs(direct_dir, gw_dir):
    res = Result()
    d_entries, d_bad = load_dir(direct_dir)
    g_entries, g_bad = load_dir(gw_dir)
    res.unreadable = [("direct", n, r) for n, r in d_bad] + [("gateway", n, r) for n, r in g_bad]
    res.n_direct, res.n_gateway = len(d_entries), len(g_entries)
    by_hash_d = collections.defaultdict(list)
    by_hash_g = collections.defaultdict(list)
    for e in d_entries:
        by_hash_d[e.digest].append(e)
    for e in g_entries:
        by_hash_g[e.digest].append(e)
    res.n_distinct = len(by_hash_d)
    for digest in sorted(set(by_hash_d) | set(by_hash_g)):
        ds = sorted(by_hash_d.get(digest, []), key=lambda e: (e.ts, e.sop_class, e.name))
        gs = sorted(by_hash_g.get(digest, []), key=lambda e: (e.ts, e.sop_class, e.name))
        # Pair equal (TS, SOP class) first, then whatever is left.
        unpaired_g = list(gs)
        unpaired_d = []
        for d in ds:
            for i, g in enumerate(unpaired_g):
                if (g.ts, g.sop_class) == (d.ts, d.sop_class):
                    del unpaired_g[i]
                    res.matched += 1
                    break
            else:
                unpaired_d.append(d)
        for d in list(unpaired_d):
            if not unpaired_g:
                break
            g = unpaired_g.pop(0)
            unpaired_d.remove(d)
            what = []
            if g.ts != d.ts:
                what.append("transfer syntax %s != %s" % (g.ts, d.ts))
            if g.sop_class != d.sop_class:
                what.append("SOP class %s != %s" % (g.sop_class, d.sop_class))
            res.meta_mismatch.append((d, g, ", ".join(what)))
        res.missing.extend(unpaired_d)
        res.extra.extend(unpaired_g)
    return res


def report(res, direct_dir, gw_dir, out=sys.stdout, limit=50):
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(
        "compare: direct %s: %d files, %d distinct data sets; gateway %s: %d files"
        % (direct_dir, res.n_direct, res.n_distinct, gw_dir, res.n_gateway)
    )
    for side, name, reason in res.unreadable[:limit]:
        p("  UNREADABLE (%s) %s: %s" % (side, name, reason))
    for e in res.missing[:limit]:
        p("  MISSING through gateway: %s" % e.describe())
    for e in res.extra[:limit]:
        p("  EXTRA through gateway (duplicate or altered): %s" % e.describe())
    for d, g, what in res.meta_mismatch[:limit]:
        p("  META MISMATCH: %s: %s vs direct %s" % (what, g.name, d.name))
    for lst in (res.unreadable, res.missing, res.extra, res.meta_mismatch):
        if len(lst) > limit:
            p("  ... and %d more of that kind" % (len(lst) - limit))
    missing_uids = {e.sop_inst for e in res.missing}
    changed = sorted({e.sop_inst for e in res.extra if e.sop_inst in missing_uids})
    for uid in changed[:limit]:
        p("  note: SOP instance %s is both missing and extra: probably altered in transit" % uid)
    p(
        "compare: %s: %d matched, %d missing, %d extra, %d meta mismatches, %d unreadable"
        % (
            "OK" if res.ok else "FAIL",
            res.matched,
            len(res.missing),
            len(res.extra),
            len(res.meta_mismatch),
            len(res.unreadable),
        )
    )


# ---------------------------------------------------------------- self-test


def _replace_meta_value(path, tag, old, new):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    elems, _ = parse_meta(bytes(data))
    e = elems[tag]
    value = bytes(data[e.value_offset : e.value_offset + e.length])
    padded_new = new.encode() + value[len(old) :]
    if not value.startswith(old.encode()) or len(padded_new) != len(value):
        raise ValueError("cannot replace %r in %s" % (old, path))
    data[e.value_offset : e.value_offset + e.length] = padded_new
    with open(path, "wb") as f:
        f.write(data)


def self_test(src):
    entries, bad = load_dir(src)
    if bad or len(entries) < 2:
        print("self-test: need at least 2 readable files in %s (unreadable: %d)" % (src, len(bad)))
        return 1
    digests = collections.Counter(e.digest for e in entries)
    uniq = [e for e in entries if digests[e.digest] == 1 and e.size > 0]
    explicit_le_ct = [
        e for e in uniq if e.ts == "1.2.840.10008.1.2.1" and e.sop_class == "1.2.840.10008.5.1.4.1.1.2"
    ]
    if len(uniq) < 3 or not explicit_le_ct:
        print("self-test: %s lacks distinct explicit-VR-LE CT files to alter" % src)
        return 1
    failures = 0
    tmp = tempfile.mkdtemp(prefix="compare-selftest-")
    try:

        def case(name, mutate, expect):
            nonlocal failures
            dst = os.path.join(tmp, name)
            shutil.copytree(src, dst)
            if mutate:
                mutate(dst)
            res = compare_dirs(src, dst)
            got = (len(res.missing), len(res.extra), len(res.meta_mismatch), res.ok)
            good = got == expect
            if not good:
                failures += 1
            print(
                "self-test: %-14s %s (missing, extra, meta mismatches, ok) = %s, expected %s"
                % (name, "detected" if good and not expect[3] else ("ok" if good else "WRONG"), got, expect)
            )

        def change(dst):
            p = os.path.join(dst, uniq[0].name)
            with open(p, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                b = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([b[0] ^ 0x01]))

        def remove(dst):
            os.unlink(os.path.join(dst, uniq[1].name))

        def extra(dst):
            shutil.copyfile(os.path.join(dst, uniq[2].name), os.path.join(dst, uniq[2].name + ".dup"))

        def ts(dst):
            _replace_meta_value(
                os.path.join(dst, explicit_le_ct[0].name), 0x00020010, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
            )

        def sop_class(dst):
            _replace_meta_value(
                os.path.join(dst, explicit_le_ct[-1].name),
                0x00020002,
                "1.2.840.10008.5.1.4.1.1.2",
                "1.2.840.10008.5.1.4.1.1.4",
            )

        case("identical", None, (0, 0, 0, True))
        case("changed", change, (1, 1, 0, False))
        case("missing", remove, (1, 0, 0, False))
        case("extra", extra, (0, 1, 0, False))
        case("transfer-syntax", ts, (0, 0, 1, False))
        case("sop-class", sop_class, (0, 0, 1, False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("self-test: %s" % ("OK" if failures == 0 else "FAIL (%d cases wrong)" % failures))
    return 0 if failures == 0 else 1


# --------------------------------------------------------------------- scan


def load_markers(path):
    with open(path) as f:
        raw = json.load(f)
    markers = {}
    for key, value in raw.items():
        if key == "pixel_chunk_hex":
            markers["pixel bytes"] = bytes.fromhex(value)
        elif isinstance(value, str):
            markers[key] = value.encode()
        elif isinstance(value, list):
            for i, v in enumerate(value):
                markers["%s[%d]" % (key, i)] = str(v).encode()
    return {k: v for k, v in markers.items() if v}


def scan_dir(path, markers):
    """Return (files, bytes, {marker name: [file, ...]}) for a directory tree."""
    found = collections.defaultdict(list)
    overlap = max(len(m) for m in markers.values()) - 1
    nfiles = nbytes = 0
    for root, dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            if not os.path.isfile(full) or os.path.islink(full):
                continue
            nfiles += 1
            hits = set()
            try:
                with open(full, "rb") as f:
                    tail = b""
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        nbytes += len(chunk)
                        buf = tail + chunk
                        for mname, m in markers.items():
                            if mname not in hits and m in buf:
                                hits.add(mname)
                        tail = buf[-overlap:] if overlap > 0 else b""
            except OSError as exc:
                print("scan: cannot read %s: %s" % (full, exc))
                found["<unreadable>"].append(full)
                continue
            for mname in hits:
                found[mname].append(os.path.relpath(full, path))
    return nfiles, nbytes, found


def scan(argv):
    if not argv:
        raise SystemExit("usage: compare.py --scan MARKERS_JSON --present DIR... --absent DIR...")
    markers = load_markers(argv[0])
    present, absent, cur = [], [], None
    for a in argv[1:]:
        if a == "--present":
            cur = present
        elif a == "--absent":
            cur = absent
        elif cur is None:
            raise SystemExit("scan: directory %s given before --present/--absent" % a)
        else:
            cur.append(a)
    if not present or not absent:
        raise SystemExit("scan: need at least one --present and one --absent directory")
    ok = True
    seen = collections.defaultdict(int)
    for d in present:
        if not os.path.isdir(d):
            print("scan: FAIL: positive-control directory %s does not exist" % d)
            ok = False
            continue
        n, b, found = scan_dir(d, markers)
        print("scan: positive control %s: %d files, %d bytes" % (d, n, b))
        for m, files in found.items():
            seen[m] += len(files)
    for m in markers:
        if seen[m] == 0:
            print("scan: FAIL: marker %s (%r) not found in the positive-control directories" % (m, markers[m][:40]))
            ok = False
    for d in absent:
        if not os.path.isdir(d):
            print("scan: FAIL: gateway data directory %s does not exist" % d)
            ok = False
            continue
        n, b, found = scan_dir(d, markers)
        print("scan: gateway data %s: %d files, %d bytes" % (d, n, b))
        for m, files in sorted(found.items()):
            ok = False
            print(
                "scan: FAIL: marker %s found in clear in %s: %s%s"
                % (m, d, ", ".join(files[:5]), " ..." if len(files) > 5 else "")
            )
    print("scan: %s (%d markers)" % ("OK" if ok else "FAIL", len(markers)))
    return 0 if ok else 1


def main(argv):
    if len(argv) >= 2 and argv[0] == "--self-test":
        return self_test(argv[1])
    if argv and argv[0] == "--scan":
        return scan(argv[1:])
    if len(argv) != 2 or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    for d in argv:
        if not os.path.isdir(d):
            print("compare: %s is not a directory" % d, file=sys.stderr)
            return 2
    res = compare_dirs(argv[0], argv[1])
    report(res, argv[0], argv[1])
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
