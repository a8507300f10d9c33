#!/usr/bin/env python3
"""Validate the custom resources of rendered manifests (cert-manager, prometheus-operator)
against the schema subsets in crd-schemas/schemas.json, offline. kubernetes-validate
checks the built-in kinds; it has no schemas for CRDs and only warns about them.

    validate-crds.py RENDERED.yaml...     exit 1 on any error or unknown custom kind
"""
import json
import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMAS = json.loads((Path(__file__).resolve().parent / "crd-schemas" / "schemas.json").read_text())


def main(files):
    errors = 0
    for f in files:
        for doc in yaml.safe_load_all(Path(f).read_text()):
            if not doc:
                continue
            api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            if "/" not in api or api.split("/")[0].endswith(".k8s.io") or "." not in api.split("/")[0]:
                continue  # a built-in group: kubernetes-validate's job
            name = doc.get("metadata", {}).get("name", "?")
            schema = SCHEMAS.get(f"{api}/{kind}")
            if schema is None:
                print(f"ERROR {f}: no schema for {api} {kind} {name}")
                errors += 1
                continue
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc):
                path = ".".join(str(p) for p in e.absolute_path)
                print(f"ERROR {f}: {kind}/{name} {path}: {e.message}")
                errors += 1
            if not errors:
                print(f"INFO {f}: {kind}/{name} passed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
