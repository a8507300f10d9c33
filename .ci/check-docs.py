#!/usr/bin/env python3
"""Check that the docs cannot rot, without building anything:

1. docs/configuration.md documents exactly the keys of the config types in
   gateway/src/config.rs: one `## `[section]`` heading per top-level key of `Config`,
   and in each section's table exactly the fields of the struct that section is parsed
   into (SECTIONS below; a struct parsed `try_from` a raw shape is checked by its raw shape).
2. Every `section.key` (or `section[name].key`) that README.md, docs/*.md or deploy/**/*.md
   mentions in backticks exists.
3. Every `dicom-gateway SUBCOMMAND` that they mention is a subcommand of the binary
   (variants of the clap `Subcommand` enums under gateway/src).

Exit 1 with one line per problem.
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG_RS = ROOT / "gateway" / "src" / "config.rs"
CONFIG_MD = ROOT / "docs" / "configuration.md"

# Dotted names in the docs that look like config keys but are not (Secret keys, YAML).
NOT_CONFIG_KEYS = {"tls.crt", "tls.passthrough"}

# TOML section -> the struct its table is deserialized as.
SECTIONS = {
    "node": "NodeSection",
    "keystore": "KeystoreSection",
    "tls": "TlsSection",
    "http": "HttpSection",
    "log": "LogSection",
    "spool": "RawSpoolSection",
    "dicom_listener": "RawDicomListener",
    "link_listener": "LinkListener",
    "hl7_listener": "Hl7Listener",
    "destination": "RawDestination",
    "destination.retry": "RawRetry",
    "route": "Route",
}


def struct_fields(src: str, name: str) -> list[str]:
    m = re.search(r"\bstruct\s+" + name + r"\s*\{", src)
    if not m:
        sys.exit(f"{CONFIG_RS}: struct {name} not found (update SECTIONS in {__file__})")
    depth, i = 1, m.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
    body = src[m.end() : i - 1]
    fields, attrs = [], []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("#["):
            attrs.append(line)
            continue
        f = re.match(r"(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:", line)
        if f:
            attr = " ".join(attrs)
            attrs = []
            if re.search(r"serde\([^)]*\bskip\b", attr):
                continue
            r = re.search(r'rename\s*=\s*"([^"]+)"', attr)
            fields.append(r.group(1) if r else f.group(1))
        elif line and not line.startswith("//"):
            attrs = []
    return fields


def doc_sections(md: str) -> dict[str, list[str]]:
    out, cur = {}, None
    for line in md.splitlines():
        h = re.match(r"###?\s+`\[\[?([\w.]+)\]?\]`", line)
        if h:
            cur = h.group(1)
            out[cur] = []
            continue
        if line.startswith("## "):
            cur = None
        if cur and line.startswith("| `"):
            out[cur].append(re.match(r"\| `([^`]+)`", line).group(1))
    return out


def subcommands() -> set[str]:
    names = set()
    for rs in (ROOT / "gateway" / "src").rglob("*.rs"):
        src = rs.read_text()
        for m in re.finditer(r"#\[derive\([^)]*\bSubcommand\b[^)]*\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub\s+)?enum\s+\w+\s*\{", src):
            depth, i = 1, m.end()
            while depth:
                depth += {"{": 1, "}": -1}.get(src[i], 0)
                i += 1
            body = src[m.end() : i - 1]
            depth = 0
            for line in body.splitlines():
                if depth == 0:
                    v = re.match(r"\s*([A-Z]\w*)\s*[{,(]?", line)
                    if v and not line.strip().startswith(("//", "#")):
                        names.add(re.sub(r"(?<!^)([A-Z])", r"-\1", v.group(1)).lower())
                depth += line.count("{") + line.count("(") - line.count("}") - line.count(")")
    return names


def main() -> int:
    errors = []
    src = CONFIG_RS.read_text()
    md = CONFIG_MD.read_text()
    documented = doc_sections(md)
    top = struct_fields(src, "Config")
    for s in top:
        if s not in documented:
            errors.append(f"{CONFIG_MD.name}: section [{s}] of Config is not documented")
    code_keys = {}
    for section, struct in SECTIONS.items():
        # A sub-table (`destination.retry`) belongs to its parent section.
        if section.split(".")[0] not in top:
            errors.append(f"{__file__}: SECTIONS names [{section}], which Config does not have")
            continue
        code_keys[section] = set(struct_fields(src, struct))
    for section, keys in documented.items():
        if section not in code_keys:
            errors.append(f"{CONFIG_MD.name}: documents [{section}], which is not a config section")
            continue
        for k in sorted(set(keys) - code_keys[section]):
            errors.append(f"{CONFIG_MD.name}: [{section}] documents `{k}`, which {SECTIONS[section]} does not have")
        for k in sorted(code_keys[section] - set(keys)):
            errors.append(f"{CONFIG_MD.name}: [{section}] does not document `{k}` of {SECTIONS[section]}")
        if len(keys) != len(set(keys)):
            errors.append(f"{CONFIG_MD.name}: [{section}] documents a key twice")

    # The conformance statement's Appendix A lists exactly what gateway/src/sop.rs accepts.
    sop = (ROOT / "gateway" / "src" / "sop.rs").read_text()
    conf_path = ROOT / "docs" / "conformance-statement.md"
    conf = conf_path.read_text()
    for const, heading in (("STORAGE_SOP_CLASSES", "### A.1"), ("TRANSFER_SYNTAXES", "### A.2")):
        i = sop.index(f"pub const {const}")
        code = set(re.findall(r'\(\s*"([0-9.]+)"', sop[i : sop.index("];", i)]))
        if const == "TRANSFER_SYNTAXES":
            # The retired JPEG processes: RETIRED_JPEG, made by the `retired_jpeg!` invocation.
            j = sop.index("retired_jpeg!(\n")
            code |= set(re.findall(r'\(\s*"([0-9.]+)"', sop[j : sop.index("\n);", j)]))
        start = conf.find(heading)
        if start < 0:
            errors.append(f"{conf_path.name}: no {heading} section")
            continue
        end = conf.find("\n### ", start + 1)
        listed = set(re.findall(r"\| `([0-9.]+)` \|", conf[start : end if end > 0 else None]))
        for u in sorted(code - listed):
            errors.append(f"{conf_path.name}: {heading} does not list {u} of sop.rs {const}")
        for u in sorted(listed - code):
            errors.append(f"{conf_path.name}: {heading} lists {u}, which sop.rs {const} does not have")

    cmds = subcommands()
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]
    key_re = re.compile(r"`(" + "|".join(SECTIONS) + r")(?:\[[^\]`]*\])?\.(\w+)")
    for doc in docs:
        text = doc.read_text()
        for m in key_re.finditer(text):
            if m.group(2) not in code_keys.get(m.group(1), ()) and f"{m.group(1)}.{m.group(2)}" not in NOT_CONFIG_KEYS:
                errors.append(f"{doc.relative_to(ROOT)}: mentions `{m.group(0)[1:]}`, which is not a config key")
        # A command: in a fenced code block or an inline code span.
        code = "\n".join(re.findall(r"```[^\n]*\n(.*?)```", text, re.S))
        code += "\n" + "\n".join(re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)))
        for m in re.finditer(r"(?:^|[\s$|;(])dicom-gateway[ \t]+([a-z][a-z0-9-]*)\b", code, re.M):
            word = m.group(1)
            if word not in cmds:
                errors.append(f"{doc.relative_to(ROOT)}: mentions `dicom-gateway {word}`, which is not a subcommand ({', '.join(sorted(cmds))})")
    for e in errors:
        print(e)
    print(f"check-docs: {sum(len(v) for v in code_keys.values())} config keys, {len(cmds)} subcommands, {len(docs)} documents: {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
