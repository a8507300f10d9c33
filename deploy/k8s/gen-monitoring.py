#!/usr/bin/env python3
"""Build the monitoring manifests of the kustomize base from their single sources.

    deploy/prometheus/alerts.yaml      -> base/monitoring/prometheusrule.yaml  (PrometheusRule)
    deploy/grafana/dicom-gateway.json  -> base/monitoring/grafana-dashboard.yaml (ConfigMap,
                                          label grafana_dashboard: "1" for Grafana's sidecar)

kustomize cannot read files outside its root, and a PrometheusRule is not a ConfigMap, so
this script is the generator. `--check` (run by .ci/run) fails when a generated file is
out of date. While a source file is missing from the tree, a clearly marked placeholder
is written instead; `--check` accepts a placeholder only while its source is missing.

alerts.yaml may be a Prometheus rules file (`groups: [...]`) or a PrometheusRule manifest.
"""
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEPLOY = HERE.parent
OUT = HERE / "base" / "monitoring"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "dicom-gateway.json"

PLACEHOLDER = "# PLACEHOLDER"


class Literal(str):
    pass


def _literal(dumper, data):
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")


yaml.SafeDumper.add_representer(Literal, _literal)


def header(src: Path) -> str:
    rel = src.relative_to(DEPLOY.parent)
    if not src.exists():
        return (
            f"{PLACEHOLDER}: {rel} is not in this tree yet; run deploy/k8s/gen-monitoring.py\n"
            f"# once it is (CI fails until then). Do not edit by hand.\n"
        )
    return f"# GENERATED from {rel} by deploy/k8s/gen-monitoring.py. Do not edit.\n"


def prometheus_rule() -> str:
    if ALERTS.exists():
        doc = yaml.safe_load(ALERTS.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
            spec = doc.get("spec") or {}
        elif isinstance(doc, dict) and "groups" in doc:
            spec = {"groups": doc["groups"]}
        else:
            sys.exit(f"{ALERTS}: expected `groups:` or a PrometheusRule")
    else:
        spec = {"groups": []}
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "dicom-gateway", "labels": {"role": "alert-rules"}},
        "spec": spec,
    }
    return header(ALERTS) + yaml.safe_dump(manifest, sort_keys=False, width=120)


def grafana_dashboard() -> str:
    if DASHBOARD.exists():
        text = DASHBOARD.read_text()
        json.loads(text)  # must be valid JSON
    else:
        text = json.dumps({"title": "dicom-gateway (placeholder)", "panels": []}, indent=2)
    if not text.endswith("\n"):
        text += "\n"
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dicom-gateway-dashboard",
            "labels": {"grafana_dashboard": "1"},
        },
        "data": {"dicom-gateway.json": Literal(text)},
    }
    return header(DASHBOARD) + yaml.safe_dump(manifest, sort_keys=False, width=1 << 20)


def main() -> int:
    check = "--check" in sys.argv[1:]
    wanted = {
        OUT / "prometheusrule.yaml": (ALERTS, prometheus_rule()),
        OUT / "grafana-dashboard.yaml": (DASHBOARD, grafana_dashboard()),
    }
    bad = 0
    for path, (src, text) in wanted.items():
        if check:
            have = path.read_text() if path.exists() else ""
            if have != text:
                print(f"{path.relative_to(DEPLOY.parent)} is out of date: run {Path(__file__).relative_to(DEPLOY.parent)}")
                bad += 1
            elif not src.exists():
                print(f"warning: {path.relative_to(DEPLOY.parent)} is a placeholder ({src.relative_to(DEPLOY.parent)} missing)")
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(DEPLOY.parent)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
