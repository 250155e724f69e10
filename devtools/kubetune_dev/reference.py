"""The README's FineTuneJob reference: one row per field of the CRD's schema (so of
api.py's models and their descriptions), written by `python -m kubetune_dev.crd` between
the README's reference markers and checked by its --check like the CRD itself."""

from __future__ import annotations

import json
from collections.abc import Iterator

START = "<!-- reference:start -->"
END = "<!-- reference:end -->"
HEADING = "## FineTuneJob reference"
INTRO = (
    "Generated from `operator/kubetune/api.py` and `trainer_image/kubetune_trainer/config.py` by\n"
    "`make generate` (`devtools/kubetune_dev/crd.py`); `make lint` fails when it drifts. Types are the\n"
    "CRD's; `[a, b]` is an inclusive range, `(` `)` an exclusive bound."
)


def _bounds(node: dict) -> str:
    lo, hi = node.get("minimum"), node.get("maximum")
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if node.get('exclusiveMinimum') else '≥'} {lo}"
    if lo is None:
        return f" {'<' if node.get('exclusiveMaximum') else '≤'} {hi}"
    return f" {'(' if node.get('exclusiveMinimum') else '['}{lo}, {hi}{')' if node.get('exclusiveMaximum') else ']'}"


def type_of(node: dict) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "integer or string"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = node.get("type", "")
    if kind == "array":
        return "[]" + type_of(node.get("items", {}))
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return "map[string]" + type_of(node["additionalProperties"])
    return kind + _bounds(node)


def _value(v) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v).replace('"', "")


def _default(node: dict, required: bool) -> str:
    if "default" not in node:
        return "required" if required else ""
    if node["default"] == {} and node.get("type") == "object":
        return ""  # only there so that server-side defaulting reaches the fields
    return f"`{_value(node['default'])}`"


def _description(node: dict) -> str:
    text = node.get("description", "")
    rules = [r["message"] for r in node.get("x-kubernetes-validations", [])]
    if rules:
        text += (" " if text else "") + "Rules: " + "; ".join(rules) + "."
    return " ".join(text.split()).replace("|", "\\|")


def fields(schema: dict, path: str) -> Iterator[tuple[str, dict, bool]]:
    """(path, schema, required) for every field under `schema`, depth first."""
    required = set(schema.get("required", []))
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}"
        yield here, sub, name in required
        if sub.get("type") == "array" and "properties" in sub.get("items", {}):
            yield from fields(sub["items"], here + "[]")
        else:
            yield from fields(sub, here)


def table(schema: dict, path: str) -> list[str]:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for where, node, required in fields(schema, path):
        rows.append(f"| `{where}` | {type_of(node)} | {_default(node, required)} | {_description(node)} |")
    return rows


def reference(spec: dict, status: dict) -> str:
    lines = [INTRO, "", "### spec", "", *table(spec, "spec"), "", "### status", ""]
    lines += ["Written by the operator; read it with `kubectl get ftj NAME -o yaml`.", ""]
    lines += table(status, "status")
    return "\n".join(lines) + "\n"


def with_reference(readme: str, spec: dict, status: dict) -> str:
    """The README with its reference section (between the markers) regenerated; the
    markers and a heading are appended when the README has none. Nothing else changes."""
    section = f"{START}\n{reference(spec, status)}{END}"
    head, start, rest = readme.partition(START)
    if start and END in rest:
        return head + section + rest.partition(END)[2]
    return readme.rstrip("\n") + f"\n\n{HEADING}\n\n{section}\n"
