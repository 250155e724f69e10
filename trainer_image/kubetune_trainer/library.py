"""The adapter library's record: what a finished run made, from what, and how well it
scores. One pydantic model, written by the trainer as adapter.json beside the adapter
(so the library survives the cluster) and by the operator as an Adapter object's spec
(kubetune.api generates the CRD from it). Both build it with adapter_record(). No torch."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from kubetune_trainer.config import ApiModel, Lora, TrainingConfig

RECORD_FILE = "adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# selection labels of an Adapter object (kubectl get ad -l ...)
BASE_LABEL = "kubetune.io/base-model"
TASK_LABEL = "kubetune.io/task"
BASE_FINGERPRINT_LABEL = "kubetune.io/base-fingerprint"
JOB_LABEL = "kubetune.io/job"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


SAMPLES_KEPT, SAMPLE_CHARS = 3, 120


def clip_samples(samples) -> list[dict]:
    """The first few (reference, prediction) pairs, in printable ASCII and cut short: they
    travel in the trainer's termination message (4096 bytes for everything), where a
    model's arbitrary output escaped as JSON could otherwise take six bytes a character."""

    def clip(text) -> str:
        return "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text)[:SAMPLE_CHARS])

    return [
        {"reference": clip(x["reference"]), "prediction": clip(x["prediction"])}
        for x in (samples if isinstance(samples, list) else [])[:SAMPLES_KEPT]
        if isinstance(x, dict)
        and isinstance(x.get("reference"), str)
        and isinstance(x.get("prediction"), str)
    ]


class Sample(ApiModel):
    reference: str = Field(max_length=SAMPLE_CHARS, description="The held-out answer.")
    prediction: str = Field(max_length=SAMPLE_CHARS, description="What the adapter generated.")


class Evaluation(ApiModel):
    split: str | None = Field(
        None, description="What was held out: the validation URI, or the fraction of the data."
    )
    examples: int | None = Field(None, description="Held-out examples generated for exact match.")
    exact_match_before: float | None = Field(None, description="Exact match of the base model.")
    exact_match: float | None = Field(
        None, description="Exact match with the adapter, on the base it was trained on (4-bit for qlora)."
    )
    exact_match_unquantized_base: float | None = Field(
        None, description="qlora: the same adapter on the unquantized base, as usually served."
    )
    eval_loss: float | None = Field(None, description="Final validation loss.")
    samples: list[Sample] | None = Field(
        None,
        max_length=SAMPLES_KEPT,
        description=f"The first {SAMPLES_KEPT} generated answers beside their references (each cut to "
        f"{SAMPLE_CHARS} characters).",
    )


class Goodput(ApiModel):
    ratio: float | None = Field(
        None,
        description="useful / (useful + lost): the share of the time spent training, or lost to "
        "interruptions of training, that became adapter (1 for a run never interrupted).",
    )
    useful_seconds: float | None = Field(
        None, description="Seconds of the optimizer steps the adapter is made of (each counted once)."
    )
    lost_seconds: float | None = Field(None, description="recomputed + restart + waiting.")
    recomputed_seconds: float | None = Field(
        None, description="Seconds of steps done again after an attempt was lost past its last checkpoint."
    )
    restart_seconds: float | None = Field(
        None, description="Resumed attempts' own start: model load, checkpoint restore, data positioning."
    )
    waiting_seconds: float | None = Field(
        None,
        description="The rest of the time between attempts: old pods stopping, waiting for capacity, "
        "scheduling, container start.",
    )
    other_seconds: float | None = Field(
        None,
        description="What an uninterrupted run spends too: the first start, evaluations, checkpoint pauses.",
    )
    wall_seconds: float | None = Field(None, description="Since the first attempt's trainer started.")
    steps_recomputed: int | None = Field(None, description="Optimizer steps done more than once.")
    attempts: int | None = Field(None, description="Attempts that trained (the ledger's count).")


class AdapterFiles(ApiModel):
    uri: str = Field(description="The adapter's folder (loadable with peft's PeftModel.from_pretrained).")
    sha256: str = Field(pattern=SHA256_PATTERN, description=f"SHA-256 of {WEIGHTS_FILE}.")
    size_bytes: int = Field(ge=0, description=f"Size of {WEIGHTS_FILE}.")


class BaseModelRecord(ApiModel):
    model: str = Field(description="The base model as the job named it: a Hub id or a folder URI.")
    revision: str | None = Field(None, description="Hub revision, when one was given.")
    method: Literal["qlora", "lora"] = Field(description="qlora: trained on the 4-bit base; lora: full.")
    quantization: str | None = Field(None, description="qlora: the 4-bit type (nf4, fp4) it was trained on.")
    fingerprint: str | None = Field(
        None,
        description="SHA-256 of the base's config.json and weight index (or safetensors headers): the "
        "same name with other weights or another architecture gives another fingerprint.",
    )


class DatasetRecord(ApiModel):
    uri: str = Field(description="The training data's prefix.")
    fingerprint: str | None = Field(
        None, description="SHA-256 of the shards read (their keys and ETags, in order)."
    )
    shards: int | None = Field(None, description="Shards read.")


class TrainingRecord(ApiModel):
    learning_rate: float
    max_steps: int
    batch_size: int
    gradient_accumulation: int
    scheduler: str
    seed: int
    max_seq_length: int
    steps: int | None = Field(None, description="Optimizer steps the adapter is made of.")


class SourceJob(ApiModel):
    name: str | None = Field(None, description="The FineTuneJob that made it.")
    namespace: str | None = None
    uid: str | None = Field(None, description="That job's UID (a later job of the same name is another).")


class InitRecord(ApiModel):
    adapter: str | None = Field(None, description="The Adapter it was warm-started from.")
    uri: str | None = Field(None, description="Its folder.")
    sha256: str | None = Field(None, description=f"Its {WEIGHTS_FILE}'s SHA-256.")


class StorageRecord(ApiModel):
    """How to reach the adapter's bucket: the source job's spec.storage (a Secret by
    reference, never its values). Not in adapter.json: that file is in the bucket."""

    endpoint: str | None = None
    region: str | None = None
    secret_name: str | None = Field(None, description="A Secret in the Adapter's namespace with S3 keys.")


class AdapterSpec(ApiModel):
    adapter: AdapterFiles = Field(description="Where the adapter is, and its hash and size.")
    base: BaseModelRecord = Field(description="What it adapts: serve it on this base.")
    task: str = Field(description="The dataset template (text-to-sql, alpaca, chat, ...).")
    dataset: DatasetRecord = Field(description="What it was trained on.")
    lora: Lora = Field(description="The adapter's shape: rank, scale, targets (and its warm start).")
    training: TrainingRecord = Field(description="The training settings that matter.")
    evaluation: Evaluation | None = Field(None, description="Held-out evaluation (dataset.validation).")
    goodput: Goodput | None = Field(None, description="How much of the job's time became this adapter.")
    init_from: InitRecord | None = Field(None, description="The adapter it continued from, if any.")
    source: SourceJob = Field(default_factory=SourceJob, description="The job that made it.")
    storage: StorageRecord | None = Field(None, description="S3 access for verifying and exporting it.")
    created: str | None = Field(None, description="When the adapter was uploaded (RFC 3339).")


# -- pure functions ------------------------------------------------------------------------


def base_model_id(cfg: TrainingConfig) -> str:
    return cfg.model.name or cfg.model.uri.rstrip("/")


def label_value(text: str) -> str:
    """A Kubernetes label value naming `text`: a Hub id keeps its name ('/' becomes '.'),
    a URI its last folder; anything longer than 63 characters ends in a hash of the whole,
    so two long names never share a label."""
    text = readable = text.rstrip("/")  # a folder URI names the same folder either way
    if "://" in readable:
        readable = readable.rsplit("/", 1)[-1] or readable.split("://", 1)[1]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", readable.replace("/", "."))
    readable = readable.strip("-_.") or "x"
    if len(readable) <= 63 and readable == text.replace("/", "."):  # (a Hub id: org.name)
        return readable
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{readable[:54].strip('-_.')}-{digest}"


def adapter_labels(spec: dict) -> dict[str, str]:
    labels = {BASE_LABEL: label_value(spec["base"]["model"]), TASK_LABEL: label_value(spec["task"])}
    if spec["base"].get("fingerprint"):
        labels[BASE_FINGERPRINT_LABEL] = spec["base"]["fingerprint"][:16]
    if (spec.get("source") or {}).get("name"):
        labels[JOB_LABEL] = spec["source"]["name"]
    return labels


def data_fingerprint(shards: list[tuple[str, str | None]]) -> str:
    """The shards read, as (key, ETag) in reading order: new data under the same prefix, or
    an object rewritten in place, changes it."""
    h = hashlib.sha256()
    for key, etag in shards:
        h.update(f"{key}\0{etag or ''}\n".encode())
    return h.hexdigest()


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file: every tensor's name, dtype, shape and offsets
    (not its values: hashing gigabytes at each start is not worth it)."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return f.read(min(size, 100 * 2**20))


def base_fingerprint(folder: Path) -> str | None:
    """A hash of a model folder's config.json and its weight index (or, for a single file,
    the safetensors header): what tells one base from another without reading its weights."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    h = hashlib.sha256(b"config.json\0" + config.read_bytes())
    for name in WEIGHT_INDEXES:
        if (folder / name).is_file():
            h.update(f"\0{name}\0".encode() + (folder / name).read_bytes())
            break
    else:
        for weights in sorted(folder.glob("*.safetensors")):
            h.update(f"\0{weights.name}\0".encode() + _safetensors_header(weights))
    return h.hexdigest()


def adapter_record(
    cfg: TrainingConfig,
    adapter: dict,
    *,
    lineage: dict | None = None,
    evaluation: dict | None = None,
    goodput: dict | None = None,
    steps: int | None = None,
    source: dict | None = None,
    created: str | None = None,
) -> dict:
    """The record of one finished run's adapter (AdapterSpec, camelCase, no nulls).
    `adapter`: {uri, sha256, sizeBytes}; `lineage`: {base, data, shards} fingerprints the
    trainer measured (its termination message carries them to the operator)."""
    lineage = lineage or {}
    init = cfg.lora.init_from
    spec = AdapterSpec(
        adapter=AdapterFiles.model_validate(adapter),
        base=BaseModelRecord(
            model=base_model_id(cfg),
            revision=cfg.model.revision,
            method=cfg.method,
            quantization=cfg.quantization.type if cfg.method == "qlora" else None,
            fingerprint=lineage.get("base"),
        ),
        task=cfg.dataset.template,
        dataset=DatasetRecord(
            uri=cfg.dataset.uri, fingerprint=lineage.get("data"), shards=lineage.get("shards")
        ),
        lora=cfg.lora.model_copy(update={"init_from": None}),
        training=TrainingRecord(
            learning_rate=cfg.training.learning_rate,
            max_steps=cfg.training.max_steps,
            batch_size=cfg.training.batch_size,
            gradient_accumulation=cfg.training.gradient_accumulation,
            scheduler=cfg.training.scheduler,
            seed=cfg.training.seed,
            max_seq_length=cfg.dataset.max_seq_length,
            steps=steps,
        ),
        evaluation=Evaluation.model_validate(evaluation) if evaluation else None,
        goodput=Goodput.model_validate(goodput) if goodput else None,
        init_from=InitRecord.model_validate(init.model_dump()) if init else None,
        source=SourceJob.model_validate(source or {}),
        created=created,
    )
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def record_json(record: dict) -> str:
    """adapter.json: the record without storage access (that belongs to a cluster)."""
    return json.dumps({k: v for k, v in record.items() if k != "storage"}, indent=1, sort_keys=True) + "\n"


def lora_shape(adapter_config) -> tuple[int, frozenset[str]]:
    """(rank, adapted module names) from a saved adapter_config.json; ValueError when it
    is not one (the file comes from a bucket: its types are not trusted)."""
    if not isinstance(adapter_config, dict):
        raise ValueError("adapter_config.json is not a JSON object")
    r, targets = adapter_config.get("r"), adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if type(r) is not int or not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError("adapter_config.json has no integer r and list of target_modules names")
    return r, frozenset(targets)


def init_mismatch(cfg: TrainingConfig, source: dict) -> str | None:
    """Why the adapter recorded in `source` (an AdapterSpec dict) cannot warm-start a run
    of `cfg`, or None. Base and LoRA shape must match; settings of the run may differ."""
    base = source.get("base") or {}
    mine = base_model_id(cfg)
    if base.get("model") != mine:
        return f"it was trained on base {base.get('model')!r}, this job's base is {mine!r}"
    if (base.get("revision") or None) != (cfg.model.revision or None):
        return f"it was trained on revision {base.get('revision')!r} of the base, this job names {cfg.model.revision!r}"
    lora = source.get("lora") or {}
    if lora.get("r") != cfg.lora.r:
        return f"its LoRA rank is {lora.get('r')}, this job's lora.r is {cfg.lora.r}"
    if sorted(lora.get("targetModules") or []) != sorted(cfg.lora.target_modules):
        return (
            f"it adapts {sorted(lora.get('targetModules') or [])}, this job's lora.targetModules are "
            f"{sorted(cfg.lora.target_modules)}"
        )
    return None
