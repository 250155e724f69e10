"""The adapter library, pure parts: an Adapter object from a finished job's record, the
warm-start resolution of spec.lora.initFrom.adapter, and what serves a set of adapters
(vLLM, KServe, KAITO). The operator and `kubetune adapters` wrap these with I/O."""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

from kubetune import api
from kubetune_trainer.config import InitFrom, TrainingConfig
from kubetune_trainer.library import (
    BASE_LABEL,
    TASK_LABEL,
    adapter_labels,
    init_mismatch,
    label_value,
)

# The servers each export targets (their API as documented for these versions).
VLLM_VERSION = "vLLM 0.11 (`vllm serve --enable-lora --lora-modules`, JSON form since 0.6)"
KSERVE_VERSION = "KServe 0.16 (LLMInferenceService serving.kserve.io/v1alpha1, spec.model.lora.adapters)"
KAITO_VERSION = "KAITO 0.4 (Workspace kaito.sh/v1alpha1, inference.adapters from images)"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubetune"}


def adapter_object(name: str, namespace: str, spec: dict) -> dict:
    """The Adapter object for a record (AdapterSpec dict). No ownerReferences: the library
    outlives the job that made the adapter (ttlSecondsAfterFinished, kubectl delete)."""
    return {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.ADAPTER_KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**adapter_labels(spec), **MANAGED_BY},
        },
        "spec": spec,
    }


def adapter_names(job_name: str, job_uid: str) -> list[str]:
    """The names an adapter of this job may take, in order: the job's, then (a library
    entry of an earlier job of that name exists) the job's with its UID's first 8 hex."""
    return [job_name, f"{job_name}-{job_uid.replace('-', '')[:8]}"]


def same_registration(found: dict, record: dict) -> bool:
    """Whether an existing Adapter is this record's (an earlier reconcile of the same
    success made it): the same source job and the same adapter files, not merely a name."""
    spec = found.get("spec") or {}
    return (spec.get("source") or {}).get("uid") == record["source"].get("uid") and spec.get(
        "adapter"
    ) == record["adapter"]


def condition(obj: dict, kind: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


class AdapterMissing(str):
    """Why a warm start waits: its Adapter does not exist (yet: the job that makes it may
    still run, or an import may be on its way). Not a failure."""


def resolve_init_from(spec: TrainingConfig, adapter: dict | None, namespace: str) -> dict | str:
    """spec.lora.initFrom.adapter resolved to {adapter, uri, sha256} (pinned in the job's
    status for every attempt), AdapterMissing, or why it cannot start this job (an
    InvalidSpec message)."""
    name = spec.lora.init_from.adapter
    where = f"spec.lora.initFrom.adapter: Adapter {name}"
    if adapter is None:
        return AdapterMissing(
            f"waiting for {where} to exist in namespace {namespace} (kubectl get ad -n {namespace})"
        )
    verified = condition(adapter, api.VERIFIED)
    if verified and verified.get("status") == "False":
        return f"{where} failed verification ({verified.get('message', '')}); it is not used"
    record = adapter.get("spec") or {}
    why = init_mismatch(spec, record)
    if why:
        return f"{where} cannot start this job: {why}"
    files = record.get("adapter") or {}
    pinned = {"adapter": name, "uri": files.get("uri"), "sha256": files.get("sha256")}
    try:  # (an Adapter made by hand may name what the trainer cannot read)
        InitFrom.model_validate(pinned)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return f"{where} cannot start this job: its adapter {problems}"
    if not pinned["uri"] or not pinned["sha256"]:
        return f"{where} cannot start this job: it records no adapter uri and sha256"
    return pinned


def matches(adapter: dict, base: str | None = None, task: str | None = None) -> bool:
    """Whether an Adapter is of this base (its Hub id, URI or label value) and task."""
    spec = adapter.get("spec") or {}
    labels = (adapter.get("metadata") or {}).get("labels") or {}
    if base is not None:
        model = (spec.get("base") or {}).get("model", "")
        if base.rstrip("/") != model.rstrip("/") and label_value(base) != labels.get(BASE_LABEL):
            return False
    return not (task is not None and task != spec.get("task") and label_value(task) != labels.get(TASK_LABEL))


def selector(base: str | None, task: str | None) -> str:
    """The label selector of `--base X --task Y` (what `kubectl get ad -l` takes)."""
    parts = []
    if base:
        parts.append(f"{BASE_LABEL}={label_value(base)}")
    if task:
        parts.append(f"{TASK_LABEL}={label_value(task)}")
    return ",".join(parts)


# -- showing ---------------------------------------------------------------------------------


def human_size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _number(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def table_rows(adapters: list[dict], wide: bool = False) -> list[list[str]]:
    head = ["NAME", "BASE", "TASK", "METRIC", "SIZE", "VERIFIED"]
    if wide:
        head += ["JOB", "EVAL-LOSS", "DATA", "URI"]
    rows = [head]
    for a in adapters:
        spec = a.get("spec") or {}
        ev = spec.get("evaluation") or {}
        verified = condition(a, api.VERIFIED)
        row = [
            a["metadata"]["name"],
            (spec.get("base") or {}).get("model", ""),
            spec.get("task", ""),
            _number(ev.get("exactMatch")),
            human_size((spec.get("adapter") or {}).get("sizeBytes")),
            verified.get("status", "") if verified else "",
        ]
        if wide:
            row += [
                (spec.get("source") or {}).get("name", ""),
                _number(ev.get("evalLoss")),
                (spec.get("dataset") or {}).get("uri", ""),
                (spec.get("adapter") or {}).get("uri", ""),
            ]
        rows.append(row)
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return (
        "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
        + "\n"
    )


COMPARED = [
    ("base", ("base", "model")),
    ("base revision", ("base", "revision")),
    ("base fingerprint", ("base", "fingerprint")),
    ("method", ("base", "method")),
    ("task", ("task",)),
    ("dataset", ("dataset", "uri")),
    ("dataset fingerprint", ("dataset", "fingerprint")),
    ("shards", ("dataset", "shards")),
    ("lora r", ("lora", "r")),
    ("lora alpha", ("lora", "alpha")),
    ("learning rate", ("training", "learningRate")),
    ("steps", ("training", "steps")),
    ("seed", ("training", "seed")),
    ("warm start from", ("initFrom", "adapter")),
    ("exact match before", ("evaluation", "exactMatchBefore")),
    ("exact match", ("evaluation", "exactMatch")),
    ("exact match, unquantized base", ("evaluation", "exactMatchUnquantizedBase")),
    ("eval loss", ("evaluation", "evalLoss")),
    ("held out", ("evaluation", "split")),
    ("goodput", ("goodput", "ratio")),
    ("size", ("adapter", "sizeBytes")),
    ("sha256", ("adapter", "sha256")),
    ("job", ("source", "name")),
]


def _at(spec: dict, path: tuple[str, ...]):
    for key in path:
        spec = spec.get(key) if isinstance(spec, dict) else None
    return spec


def compare_rows(a: dict, b: dict) -> list[list[str]]:
    """The two adapters' records side by side, a '*' where they differ."""
    rows = [["", a["metadata"]["name"], b["metadata"]["name"], ""]]
    for label, path in COMPARED:
        x, y = _at(a.get("spec") or {}, path), _at(b.get("spec") or {}, path)
        if x is None and y is None:
            continue
        if path == ("adapter", "sizeBytes"):
            x, y = human_size(x), human_size(y)
        rows.append(
            [
                label,
                _number(x) if x is not None else "-",
                _number(y) if y is not None else "-",
                "" if x == y else "*",
            ]
        )
    return rows


# -- serving handoff -------------------------------------------------------------------------


def serving_name(adapter: dict) -> str:
    """The name a server knows the adapter by (the `model` of a request): the Adapter's."""
    return adapter["metadata"]["name"]


def one_base(adapters: list[dict]) -> str:
    bases = sorted({(a.get("spec") or {}).get("base", {}).get("model") for a in adapters})
    if len(bases) != 1:
        raise ValueError(f"a server runs one base model; these adapters have {len(bases)}: {bases}")
    return bases[0]


def vllm_export(adapters: list[dict], folders: dict[str, str]) -> dict:
    """`vllm serve` for these adapters: the base, and the arguments naming each adapter's
    local folder (vLLM loads LoRA from disk or the Hub, not S3: `folders` are where
    `kubetune adapters export` downloaded and verified them)."""
    base = one_base(adapters)
    rank = max(int((a["spec"].get("lora") or {}).get("r", 16)) for a in adapters)
    args = ["--enable-lora", "--max-lora-rank", str(_vllm_rank(rank)), "--max-loras", str(len(adapters))]
    args.append("--lora-modules")
    args += [
        json.dumps(
            {"name": serving_name(a), "path": folders[serving_name(a)], "base_model_name": base},
            separators=(",", ":"),
        )
        for a in adapters
    ]
    return {
        "model": base,
        "args": args,
        "adapters": {serving_name(a): folders[serving_name(a)] for a in adapters},
    }


VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _vllm_rank(r: int) -> int:
    """vLLM's --max-lora-rank takes one of a fixed set of values: the smallest that fits."""
    return next((v for v in VLLM_RANKS if v >= r), r)


def _k8s_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:63].strip("-") or "adapters"


def kserve_export(adapters: list[dict], name: str | None = None) -> dict:
    """A KServe LLMInferenceService serving the base with these adapters (KServe's storage
    initializer reads s3:// URIs itself)."""
    base = one_base(adapters)
    base_uri = base if "://" in base else f"hf://{base}"
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LLMInferenceService",
        "metadata": {"name": name or _k8s_name(base.rstrip("/").rsplit("/", 1)[-1])},
        "spec": {
            "model": {
                "uri": base_uri,
                "name": base,
                "lora": {
                    "adapters": [
                        {"name": serving_name(a), "uri": a["spec"]["adapter"]["uri"]} for a in adapters
                    ]
                },
            }
        },
    }


def kaito_export(
    adapters: list[dict], image_repo: str, preset: str | None = None, name: str | None = None
) -> dict:
    """A KAITO Workspace with these adapters. KAITO takes adapters as images (the adapter
    files under /data): one per adapter, tagged with the first 12 hex of its sha256."""
    base = one_base(adapters)
    preset = preset or _k8s_name(base.rstrip("/").rsplit("/", 1)[-1])
    return {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": name or f"{preset}-adapters"[:63]},
        "resource": {"labelSelector": {"matchLabels": {"apps": preset}}},
        "inference": {
            "preset": {"name": preset},
            "adapters": [
                {
                    "source": {
                        "name": serving_name(a),
                        "image": f"{image_repo.rstrip('/')}/{serving_name(a)}:{a['spec']['adapter']['sha256'][:12]}",
                    },
                    "strength": "1.0",
                }
                for a in adapters
            ],
        },
    }
