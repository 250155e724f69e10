"""api.py -> structural OpenAPI v3 schemas -> the FineTuneJob and Adapter CRDs (crds/ and the chart).

pydantic's JSON schema is not structural as is: it has $defs/$ref, anyOf with null for
Optional, titles, and JSON-Schema-2020 exclusive bounds. This rewrites it: refs
inlined, Optional fields plain (the API server prunes nulls of non-nullable fields),
titles dropped, exclusive bounds in OpenAPI v3.0 form, `default: {}` on nested objects
so server-side defaulting reaches their fields.

    python -m kubetune_dev.crd            write crds/, the chart copy and the README's reference
    python -m kubetune_dev.crd --check    fail if they differ from what api.py gives
"""

from __future__ import annotations

import argparse
import copy
import sys

import yaml

from kubetune import api
from kubetune_dev import REPO_ROOT, reference
from kubetune_trainer.config import RUN_FIELDS

CRD_FILE = REPO_ROOT / "crds" / f"{api.GROUP}_{api.PLURAL}.yaml"
CHART_CRD_FILE = REPO_ROOT / "charts" / "kubetune" / "templates" / "crds" / f"{api.PLURAL}.yaml"
ADAPTER_CRD_FILE = REPO_ROOT / "crds" / f"{api.GROUP}_{api.ADAPTER_PLURAL}.yaml"
CHART_ADAPTER_CRD_FILE = (
    REPO_ROOT / "charts" / "kubetune" / "templates" / "crds" / f"{api.ADAPTER_PLURAL}.yaml"
)
README_FILE = REPO_ROOT / "README.md"
HEADER = "# Generated from operator/kubetune/api.py by `python -m kubetune_dev.crd`. Do not edit.\n"

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions"},
    {"name": "Failures", "type": "integer", "jsonPath": ".status.failures", "priority": 1},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta", "priority": 1},
    {"name": "Exact-Match", "type": "number", "jsonPath": ".status.evaluation.exactMatch", "priority": 1},
    {"name": "Goodput", "type": "number", "jsonPath": ".status.goodput.ratio", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def structural(schema: dict, defs: dict) -> dict:
    """Rewrite one pydantic JSON-schema node into its structural OpenAPI v3 form."""
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].rsplit("/", 1)[1]])
        target.update({k: v for k, v in schema.items() if k != "$ref"})
        return structural(target, defs)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions other than Optional are not structural: {schema}")
        merged = {**options[0], **{k: v for k, v in schema.items() if k != "anyOf"}}
        if merged.get("default", 0) is None:
            del merged["default"]
        return {**structural(merged, defs), "_optional": True}
    out = {}
    for key, value in schema.items():
        if key in ("title", "$defs"):
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            continue  # false: unknown fields are pruned by the API server anyway
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out[key.replace("exclusiveM", "m")] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        for name, sub in out["properties"].items():
            optional = sub.pop("_optional", False)  # Optional objects stay absent unless given
            if (
                sub.get("type") == "object"
                and not optional
                and "default" not in sub
                and name not in out.get("required", [])
            ):
                sub["default"] = {}
    return out


def spec_schema() -> dict:
    raw = api.FineTuneJobSpec.model_json_schema(by_alias=True, mode="validation")
    schema = structural(raw, raw.get("$defs", {}))
    # changed under a running job, these would resume its checkpoints into another run
    schema.setdefault("x-kubernetes-validations", []).extend(
        {
            "rule": f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
            "message": f"spec.{f} cannot change once the job exists: its checkpoints belong to the "
            "original run; create a new FineTuneJob",
        }
        for f in RUN_FIELDS
    )
    return schema


NAME_RULES = [
    {
        "rule": f"self.metadata.name.size() <= {api.MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters "
        "(pod and host names are derived from it)",
    },
    {
        "rule": f"self.metadata.name.matches(r'{api.DNS_LABEL}')",
        "message": "metadata.name must be a DNS label (lowercase letters, digits and '-', no dots): "
        "it is the worker pods' subdomain",
    },
    {
        "rule": "!has(self.spec.workers) || self.spec.workers <= 1 || self.metadata.name.matches('^[a-z]')",
        "message": "with workers > 1, metadata.name must start with a letter: it names the job's headless "
        "Service",
    },
]


def status_schema() -> dict:
    raw = api.FineTuneJobStatus.model_json_schema(by_alias=True, mode="serialization")
    schema = structural(raw, raw.get("$defs", {}))
    _strip_defaults(schema)  # the operator writes every status field it means
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def _strip_defaults(schema: dict) -> None:
    schema.pop("default", None)
    for sub in schema.get("properties", {}).values():
        _strip_defaults(sub)
    if isinstance(schema.get("items"), dict):
        _strip_defaults(schema["items"])


def crd_document(
    kind: str,
    plural: str,
    short_name: str,
    description: str,
    spec: dict,
    status: dict,
    columns: list[dict],
    rules: list[dict] = (),
) -> dict:
    root = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if rules:
        root["x-kubernetes-validations"] = list(rules)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["kubetune"] if kind == api.ADAPTER_KIND else ["all", "kubetune"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def crd() -> dict:
    return crd_document(
        api.KIND,
        api.PLURAL,
        api.SHORT_NAME,
        "A fine-tuning job: a base model, data on S3, LoRA/QLoRA settings, "
        "and where checkpoints and the adapter go.",
        spec_schema(),
        status_schema(),
        PRINTER_COLUMNS,
        NAME_RULES,
    )


ADAPTER_COLUMNS = [
    {"name": "Base", "type": "string", "jsonPath": ".spec.base.model"},
    {"name": "Task", "type": "string", "jsonPath": ".spec.task"},
    {"name": "Metric", "type": "number", "jsonPath": ".spec.evaluation.exactMatch"},
    {"name": "Size", "type": "integer", "jsonPath": ".spec.adapter.sizeBytes"},
    {"name": "Verified", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Verified")].status'},
    {"name": "Job", "type": "string", "jsonPath": ".spec.source.name", "priority": 1},
    {"name": "Eval-Loss", "type": "number", "jsonPath": ".spec.evaluation.evalLoss", "priority": 1},
    {"name": "URI", "type": "string", "jsonPath": ".spec.adapter.uri", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _model_schema(model, mode: str) -> dict:
    raw = model.model_json_schema(by_alias=True, mode=mode)
    return structural(raw, raw.get("$defs", {}))


def adapter_crd() -> dict:
    status = _model_schema(api.AdapterStatus, "serialization")
    _strip_defaults(status)
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return crd_document(
        api.ADAPTER_KIND,
        api.ADAPTER_PLURAL,
        api.ADAPTER_SHORT_NAME,
        "A LoRA adapter in the library: where it is and its sha256, the base it adapts, the data and "
        "settings it was trained with, its evaluation and the job that made it.",
        _model_schema(api.AdapterSpec, "validation"),
        status,
        ADAPTER_COLUMNS,
    )


def render(doc: dict | None = None) -> str:
    return HEADER + yaml.safe_dump(doc or crd(), sort_keys=False, width=120)


# helm uninstall must not take every FineTuneJob (and its pods) with the CRD, nor the library
CHART_CRD_ANNOTATIONS = {"helm.sh/resource-policy": "keep"}


def chart_render(doc: dict | None = None) -> str:
    doc = doc or crd()
    doc["metadata"]["annotations"] = dict(CHART_CRD_ANNOTATIONS)
    body = yaml.safe_dump(doc, sort_keys=False, width=120)
    return (
        HEADER.replace("# ", "{{- /* ", 1).rstrip()
        + " */}}\n{{- if .Values.crds.enabled }}\n"
        + body
        + "{{- end }}\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail on drift instead of writing")
    args = ap.parse_args(argv)
    wanted = {
        CRD_FILE: render(),
        CHART_CRD_FILE: chart_render(),
        ADAPTER_CRD_FILE: render(adapter_crd()),
        CHART_ADAPTER_CRD_FILE: chart_render(adapter_crd()),
    }
    if README_FILE.exists():
        wanted[README_FILE] = reference.with_reference(
            README_FILE.read_text(), spec_schema(), status_schema()
        )
    drift = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in drift:
            print(
                f"{p.relative_to(REPO_ROOT)} is out of date: run `python -m kubetune_dev.crd`",
                file=sys.stderr,
            )
        return 1 if drift else 0
    for p in drift:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(wanted[p])
        print(f"wrote {p.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
