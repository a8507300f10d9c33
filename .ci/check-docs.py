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
4. Metrics (gateway/src/metrics.rs is the catalogue: names, label names, kinds):
   - every `dicom_gateway_*` name in README.md, CHANGELOG.md, docs/*.md and deploy/**
     (alert rules, Grafana dashboard, generated manifests, example configs) is a metric
     of the catalogue (histograms with `_bucket`, `_sum`, `_count`);
   - every label name they give it (`name{label}`, `name{label="x"}`, in PromQL also
     `by`/`without`/`on`/`ignoring`/`group_*` clauses, Grafana's `label_values(m, label)`
     and an alert's `{{ $labels.x }}`) is one of its labels or a target label
     (`instance`, `job`; `le` on a histogram bucket);
   - a backticked bare name with labels in README.md or docs/*.md (`received_objects_total{listener}`)
     is checked the same way once prefixed;
   - a metric the gateway defines but never sets (no `.inc`, `.set`, `.observe` outside
     metrics.rs and tests) is used by no alert rule and no dashboard panel, and the docs
     mention it only in a paragraph that says it is not set yet;
   - deploy/k8s/base/monitoring/prometheusrule.yaml holds exactly the rule groups of
     deploy/prometheus/alerts.yaml (it is generated from it by deploy/k8s/gen-monitoring.py).

Exit 1 with one line per problem.
"""
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG_RS = ROOT / "gateway" / "src" / "config.rs"
CONFIG_MD = ROOT / "docs" / "configuration.md"
METRICS_RS = ROOT / "gateway" / "src" / "metrics.rs"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dicom-gateway.json"
PREFIX = "dicom_gateway_"
# Labels Prometheus adds to every series it scrapes (see docs/operations.md, "Alerts").
TARGET_LABELS = {"instance", "job"}
# Words that say, in the paragraph that mentions it, that a metric is not set yet.
NOT_SET_WORDS = re.compile(r"not (?:set|wired|exported)|never set|defined but not", re.I)

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
    "dicom_listener.tls": "DicomListenerTls",
    "link_listener": "LinkListener",
    "hl7_listener": "Hl7Listener",
    "destination": "RawDestination",
    "destination.retry": "RawRetry",
    "destination.tls": "DestinationTls",
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


def catalogue() -> dict[str, dict]:
    """Every metric of metrics.rs: full name -> {"labels", "kind", "field"}."""
    src = METRICS_RS.read_text()
    src = re.split(r"\n#\[cfg\(test\)\]\s*\nmod tests", src)[0]
    out = {}
    # `field: cv("name", "help", &["a", "b"])` or `let field = g("name", "help")`.
    call = re.compile(
        r'(?:let\s+)?(\w+)\s*[:=]\s*(cv|gv|fgv|g|hv)\(\s*"([a-z0-9_]+)",\s*"(?:[^"\\]|\\.)*",?\s*(?:&\[([^\]]*)\])?',
        re.S,
    )
    for m in call.finditer(src):
        field, ctor, name, labels = m.groups()
        kind = {"cv": "counter", "gv": "gauge", "fgv": "gauge", "g": "gauge", "hv": "histogram"}[ctor]
        out[PREFIX + name] = {
            "labels": set(re.findall(r'"(\w+)"', labels or "")),
            "kind": kind,
            "field": field,
        }
    if not out:
        sys.exit(f"{METRICS_RS}: no metric definitions found (update catalogue() in {__file__})")
    return out


def never_set(cat: dict[str, dict]) -> set[str]:
    """Metrics whose field no code outside metrics.rs and the tests ever sets.

    A use sets the metric when its statement calls `.inc`, `.inc_by`, `.dec`, `.set`,
    `.observe` or `ActiveGuard::new`, or binds it with `let x = ...` and `x` is set later in
    the file. Creating a series at zero (`with_label_values(..);` alone) is not setting it.
    `build_info` is set in metrics.rs itself.
    """
    setter = re.compile(r"\.(?:inc|inc_by|dec|set|observe)\(|ActiveGuard::new")
    sources = []
    for rs in (ROOT / "gateway" / "src").rglob("*.rs"):
        if rs == METRICS_RS:
            continue
        sources.append(re.split(r"\n#\[cfg\(test\)\]\s*\nmod tests", rs.read_text())[0])
    metrics_src = re.split(r"\n#\[cfg\(test\)\]\s*\nmod tests", METRICS_RS.read_text())[0]
    unset = set()
    for name, m in cat.items():
        field = m["field"]
        if re.search(r"\b" + field + r"\s*\.with_label_values\([^;]*\)\s*\.set\(", metrics_src):
            continue  # set once when the registry is made (build_info)
        found = False
        for src in sources:
            for occ in re.finditer(r"\." + field + r"\b(?!\s*\()", src):
                start = max(src.rfind(";", 0, occ.start()), src.rfind("{", 0, occ.start()), src.rfind("}", 0, occ.start())) + 1
                end = src.find(";", occ.end())
                stmt = src[start : end if end > 0 else None]
                if setter.search(stmt):
                    found = True
                    break
                let = re.match(r"\s*let\s+(?:mut\s+)?(\w+)\s*=", stmt)
                if let and re.search(r"\b" + let.group(1) + r"\s*\.(?:inc|inc_by|dec|set|observe)\(", src[end:]):
                    found = True
                    break
            if found:
                break
        if not found:
            unset.add(name)
    return unset


def base_metric(name: str, cat: dict) -> tuple[str | None, set[str]]:
    """The catalogue metric a series name belongs to, and the extra labels of that series."""
    if name in cat:
        return name, set()
    for suffix, extra in (("_bucket", {"le"}), ("_sum", set()), ("_count", set())):
        if name.endswith(suffix) and cat.get(name[: -len(suffix)], {}).get("kind") == "histogram":
            return name[: -len(suffix)], extra
    return None, set()


def label_names(matchers: str) -> list[str]:
    """Label names in the inside of `{...}`: `a, b` or `a="x", b=~"y"`."""
    out = []
    for part in re.findall(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+', matchers):
        part = part.strip()
        m = re.match(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=|$)", part)
        if m:
            out.append(m.group(1))
    return out


def check_series(where: str, name: str, matchers: str | None, cat: dict, errors: list) -> set[str]:
    """Check one mention of a series; return the labels it can carry (empty if unknown)."""
    base, extra = base_metric(name, cat)
    if base is None:
        errors.append(f"{where}: `{name}` is not a metric of {METRICS_RS.relative_to(ROOT)}")
        return set()
    allowed = cat[base]["labels"] | extra | TARGET_LABELS
    for label in label_names(matchers or ""):
        if label not in allowed:
            errors.append(f"{where}: `{name}` has no label `{label}` (it has: {', '.join(sorted(cat[base]['labels'])) or 'none'})")
    return allowed


def check_promql(where: str, expr: str, cat: dict, errors: list, extra_labels: list[str] = ()) -> None:
    """Metric names, selector labels and grouping labels of one PromQL expression."""
    allowed = set(TARGET_LABELS)
    seen = False
    for m in re.finditer(r"\b(" + PREFIX + r"\w+)\s*(?:\{([^}]*)\})?", expr):
        allowed |= check_series(where, m.group(1), m.group(2), cat, errors)
        seen = True
    if not seen:
        return
    grouped = []
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        grouped += [x.strip() for x in m.group(1).split(",") if x.strip()]
    for m in re.finditer(r"label_values\(\s*(" + PREFIX + r"\w+)[^,]*,\s*(\w+)\s*\)", expr):
        base, extra = base_metric(m.group(1), cat)
        if base and m.group(2) not in cat[base]["labels"] | extra | TARGET_LABELS:
            errors.append(f"{where}: label_values of `{m.group(1)}` asks for `{m.group(2)}`, which it does not have")
    for label in [*grouped, *extra_labels]:
        if label not in allowed:
            errors.append(f"{where}: label `{label}` is on none of the metrics of `{' '.join(expr.split())}`")


def dashboard_exprs(node, path="") -> list[tuple[str, str]]:
    out = []
    if isinstance(node, dict):
        title = node.get("title", "")
        for k, v in node.items():
            if k in ("expr", "query", "definition") and isinstance(v, str):
                out.append((f"{path}/{title}" if title else path, v))
            else:
                out += dashboard_exprs(v, f"{path}/{title}" if title else path)
    elif isinstance(node, list):
        for x in node:
            out += dashboard_exprs(x, path)
    return out


def check_metrics(errors: list) -> tuple[dict, set]:
    cat = catalogue()
    unset = never_set(cat)
    try:
        import yaml
    except ImportError:
        # .ci/run has PyYAML in its tools virtualenv (deploy/k8s/check.sh runs first): use it.
        venv = Path("/var/tmp/dicom-gateway-tools/bin/python")
        if venv.exists() and not os.environ.get("CHECK_DOCS_REEXEC"):
            os.environ["CHECK_DOCS_REEXEC"] = "1"
            os.execv(str(venv), [str(venv), __file__, *sys.argv[1:]])
        errors.append(f"{__file__}: PyYAML is missing (apt-get install python3-yaml): cannot read the alert rules")
        return cat, unset

    # Alert rules: every expression, and the labels its annotations use.
    rules = yaml.safe_load(ALERTS.read_text())
    promised = set()
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            where = f"{ALERTS.relative_to(ROOT)}: {name}"
            expr = str(rule.get("expr", ""))
            texts = " ".join(str(v) for v in (rule.get("annotations") or {}).values())
            check_promql(where, expr, cat, errors, re.findall(r"\$labels\.(\w+)", texts))
            promised |= set(re.findall(r"\b" + PREFIX + r"\w+", expr))

    # The PrometheusRule is generated from alerts.yaml: same groups, rule for rule.
    if not PROMETHEUS_RULE.exists():
        errors.append(f"{PROMETHEUS_RULE.relative_to(ROOT)} is missing: run deploy/k8s/gen-monitoring.py")
    else:
        pr = yaml.safe_load(PROMETHEUS_RULE.read_text())
        if (pr or {}).get("kind") != "PrometheusRule":
            errors.append(f"{PROMETHEUS_RULE.relative_to(ROOT)}: not a PrometheusRule")
        elif (pr.get("spec") or {}).get("groups") != rules.get("groups"):
            errors.append(
                f"{PROMETHEUS_RULE.relative_to(ROOT)}: its rules differ from {ALERTS.relative_to(ROOT)}: run deploy/k8s/gen-monitoring.py"
            )

    # The dashboard: every query.
    dash = json.loads(DASHBOARD.read_text())
    for where, expr in dashboard_exprs(dash):
        check_promql(f"{DASHBOARD.relative_to(ROOT)}: panel {where or '/'}", expr, cat, errors)
        promised |= set(re.findall(r"\b" + PREFIX + r"\w+", expr))

    for name in sorted(promised):
        base, _ = base_metric(name, cat)
        if base in unset:
            errors.append(f"alerts or dashboard use `{name}`, which the gateway never sets")

    # Every other file of deploy/ (manifests, examples, scripts) and the Markdown documents.
    texts = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts += [
        p
        for p in sorted((ROOT / "deploy").rglob("*"))
        if p.is_file() and p not in (ALERTS, DASHBOARD) and p.suffix in (".md", ".yaml", ".yml", ".toml", ".json", ".sh", ".py", ".txt", "")
        and "crd-schemas" not in p.parts
    ]
    for doc in texts:
        rel = doc.relative_to(ROOT)
        text = doc.read_text()
        if doc == PROMETHEUS_RULE or doc.name == "grafana-dashboard.yaml":
            # Generated from files checked above; names only (the PromQL is checked there).
            for m in re.finditer(r"\b(" + PREFIX + r"\w+)", text):
                check_series(str(rel), m.group(1), None, cat, errors)
            continue
        for m in re.finditer(r"\b(" + PREFIX + r"\w+)(?:\{([^}\n]*)\})?", text):
            check_series(str(rel), m.group(1), m.group(2), cat, errors)
        if doc.suffix != ".md":
            continue
        # `forwarded_objects_total{destination="pacs"}` without the prefix (not in the
        # CHANGELOG, whose rename table lists the old names on purpose).
        if doc.name != "CHANGELOG.md":
            for m in re.finditer(r"`([a-z][a-z0-9_]*)\{([^}`]*)\}`", text):
                if not m.group(1).startswith(PREFIX):
                    check_series(str(rel), PREFIX + m.group(1), m.group(2), cat, errors)
        # A metric that is never set is mentioned only as such.
        for para in re.split(r"\n\s*\n", text):
            for name in sorted(set(re.findall(r"\b(?:" + PREFIX + r")?(" + "|".join(n[len(PREFIX):] for n in unset) + r")\b", para))) if unset else ():
                if not NOT_SET_WORDS.search(para):
                    errors.append(f"{rel}: mentions `{name}`, which the gateway never sets, without saying so")
    return cat, unset


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
    cat, unset = check_metrics(errors)
    errors = list(dict.fromkeys(errors))  # one line per problem, in order
    for e in errors:
        print(e)
    if unset:
        print(f"check-docs: defined in metrics.rs but never set: {', '.join(sorted(unset))}")
    print(
        f"check-docs: {sum(len(v) for v in code_keys.values())} config keys, {len(cmds)} subcommands, "
        f"{len(cat)} metrics, {len(docs)} documents: {len(errors)} problems"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
