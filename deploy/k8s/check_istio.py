"""Validates the Istio resources of a rendered manifest against Istio's API.

Usage: check_istio.py RENDERED.yaml

kubernetes-validate has no schemas for Istio's kinds. The cloudcoil Istio
models (PyPI cloudcoil-models-istio, generated from Istio's CRDs) check
types, enums and required fields; they drop unknown fields silently, so a
field present in the input but absent from the validated model's dump is
reported too (a misspelt `retryOn` would otherwise turn retries off
without a word).
"""

import sys

import pydantic
import yaml
from cloudcoil.models.istio.networking import v1 as networking
from cloudcoil.models.istio.security import v1 as security

MODULES = {"networking.istio.io/v1": networking, "security.istio.io/v1": security}


def unknown_fields(given, kept, path):
    """Key paths of `given` that validation did not keep."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                yield f"{path}.{key}"
            else:
                yield from unknown_fields(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (g, k) in enumerate(zip(given, kept)):
            yield from unknown_fields(g, k, f"{path}[{i}]")


def main():
    problems, checked = [], 0
    for doc in yaml.safe_load_all(open(sys.argv[1])):
        module = MODULES.get((doc or {}).get("apiVersion"))
        if module is None:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        model = getattr(module, doc["kind"], None)
        if model is None:
            problems.append(f"{where}: no such kind in {doc['apiVersion']}")
            continue
        try:
            obj = model.model_validate(doc)
        except pydantic.ValidationError as e:
            problems.append(f"{where}: {e}")
            continue
        kept = obj.model_dump(mode="json", by_alias=True, exclude_unset=True)
        for field in unknown_fields(doc.get("spec", {}), kept.get("spec", {}), "spec"):
            problems.append(f"{where}: unknown field {field}")
        checked += 1
    for p in problems:
        print(f"check_istio: ERROR: {p}", file=sys.stderr)
    if not checked and not problems:
        print("check_istio: ERROR: no Istio resource found", file=sys.stderr)
        sys.exit(1)
    print(f"check_istio: {checked} Istio resources valid against the Istio API models")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
