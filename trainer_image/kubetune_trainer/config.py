"""The training part of a FineTuneJob: what to fine-tune, on which data, how, and where
checkpoints and the adapter go. One pydantic model read by the operator (it is part of
the CRD schema) and by the trainer (it reads the JSON the operator renders). No torch."""

from __future__ import annotations

import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file:///.*)$"
CONFIG_ENV = "KUBETUNE_CONFIG"


Uri = Annotated[
    str,
    Field(
        pattern=URI_PATTERN,
        max_length=1024,
        description="s3://bucket/prefix/ (with spec.storage credentials) or file:///absolute/path",
    ),
]


class ApiModel(BaseModel):
    """camelCase on the wire (Kubernetes convention), snake_case in Python; unknown
    fields are errors so a typo never passes silently."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )


class ModelSource(ApiModel):
    name: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Hugging Face Hub id, e.g. codellama/CodeLlama-7b-hf; needs hub access from the cluster.",
    )
    uri: Uri | None = Field(None, description="An HF-format model folder on S3 or a local path.")
    revision: str | None = Field(None, max_length=128, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Opt in only for models you trust."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.name is None) == (self.uri is None):
            raise ValueError("set exactly one of model.name and model.uri")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.name) != has(self.uri)", "message": "set exactly one of name and uri"}
            ]
        }
    )


class Template(str, Enum):
    text_to_sql = "text-to-sql"
    alpaca = "alpaca"
    chat = "chat"
    completion = "completion"
    classification = "classification"
    custom = "custom"


class Validation(ApiModel):
    fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of records, chosen by a hash of the record."
    )
    uri: Uri | None = Field(None, description="Separate validation shards.")
    generate: int = Field(
        0,
        ge=0,
        le=1000,
        description="Also generate answers for this many held-out examples and report their exact match "
        "with the reference, before and after training (status, metrics.json, model card).",
    )

    @model_validator(mode="after")
    def _at_most_one(self) -> Validation:
        if self.fraction is not None and self.uri is not None:
            raise ValueError("set at most one of validation.fraction and validation.uri")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.fraction) && has(self.uri))",
                    "message": "set at most one of fraction and uri",
                }
            ]
        }
    )


class Dataset(ApiModel):
    uri: Uri = Field(
        description="Prefix of *.jsonl, *.jsonl.gz, *.jsonl.zst or *.parquet shards, streamed in order."
    )
    template: Template = Field(
        Template.completion, description="How a record becomes a prompt and a response."
    )
    fields: dict[str, Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict,
        max_length=16,
        description="Template role -> record field, e.g. {input: question, context: context, output: answer}.",
    )
    format: str | None = Field(
        None,
        max_length=4096,
        description="For template custom: a Python format string over record fields; "
        "the response follows the last '{output}'-free prefix.",
    )
    validation: Validation | None = Field(
        None, description="Held-out data for the validation loss (and generate); none by default."
    )
    max_seq_length: int = Field(512, ge=16, le=131072, description="Tokens per training sequence.")
    packing: bool = Field(True, description="Pack several examples into each sequence (no padding waste).")
    shuffle: bool = Field(
        True,
        description="Visit shards in an order drawn from seed and epoch, and permute records within "
        "windows of 1024; deterministic, so a resumed run reads exactly what the interrupted one would have.",
    )
    train_on_inputs: bool = Field(False, description="Also compute the loss on prompt tokens.")
    max_bad_records: float = Field(
        0.01, ge=0, le=1, description="Fraction of malformed records tolerated before the job fails."
    )

    @model_validator(mode="after")
    def _custom_needs_format(self) -> Dataset:
        if (self.template == Template.custom.value) != (self.format is not None):
            raise ValueError("dataset.format is required with template custom and only allowed with it")
        marker = "{" + self.fields.get("output", "output") + "}"
        if self.format is not None and marker not in self.format:
            raise ValueError(f"dataset.format must contain {marker}: the response starts there")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(self.template == 'custom') == has(self.format)",
                    "message": "format is required with template custom and only allowed with it",
                },
                {
                    "rule": "!has(self.format) || self.format.contains('{' + "
                    "(has(self.fields) && 'output' in self.fields ? self.fields['output'] : 'output') + '}')",
                    "message": "format must contain {output} (or the field that fields.output names): "
                    "the response starts there",
                },
            ]
        }
    )


class Method(str, Enum):
    qlora = "qlora"
    lora = "lora"


class InitFrom(ApiModel):
    adapter: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="An Adapter in the job's namespace (kubectl get ad): its weights, pinned by their "
        "sha256 when the job starts.",
    )
    uri: Uri | None = Field(
        None, description="An adapter folder (adapter_model.safetensors + adapter_config.json)."
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected SHA-256 of its adapter_model.safetensors (default: the one its _COMPLETE.json "
        "lists; set by the operator for an adapter).",
    )

    @model_validator(mode="after")
    def _names_one(self) -> InitFrom:
        if self.adapter is None and self.uri is None:
            raise ValueError("lora.initFrom needs adapter (an Adapter's name) or uri")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.adapter) || has(self.uri)", "message": "set adapter or uri"}
            ]
        }
    )


class Lora(ApiModel):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout probability on each adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="Module names to adapt; [all-linear] adapts every linear layer but the output head.",
    )
    init_from: InitFrom | None = Field(
        None,
        description="Warm start: begin from an existing adapter's weights (continued training on new data) "
        "instead of a fresh adapter. Its base model and LoRA shape (r, targetModules) must be this job's.",
    )


class Quantization(ApiModel):
    type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type of the frozen base weights: nf4 (QLoRA's NormalFloat) or fp4."
    )
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: bfloat16 on Ampere+ and Intel GPUs, float16 on older GPUs; on CPU bfloat16 where "
        "the CPU has native bf16 matmuls (AMX, AVX-512 BF16) and a probe at start measures them faster, "
        "float32 elsewhere.",
    )


class Training(ApiModel):
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(4, ge=1, le=4096, description="Sequences per device per micro-step.")
    gradient_accumulation: int = Field(4, ge=1, le=4096, description="Micro-steps per optimizer step.")
    max_steps: int = Field(300, ge=1, le=10_000_000, description="Optimizer steps.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after the warmup."
    )
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="Fraction of maxSteps over which the learning rate rises from 0."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm.")
    optimizer: Literal["adamw", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"] = Field(
        "adamw",
        description="adamw: PyTorch's, 32-bit states; the others are bitsandbytes': 8-bit states take a "
        "quarter of the memory, paged ones move to CPU memory when the GPU runs short.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Keep only each decoder block's input and recompute the rest in the backward pass: "
        "far less activation memory for about a third more compute.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Data parallelism across ranks: ddp keeps the whole (quantized) base model on every "
        "device; fsdp shards it across devices (FSDP-QLoRA), for base models too big for one GPU.",
    )
    seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Seeds the adapters' initialisation, dropout and data order."
    )
    logging_steps: int = Field(10, ge=1, description="Log the loss every this many optimizer steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: at the end).")


class Checkpoint(ApiModel):
    uri: Uri = Field(description="Checkpoints go to <uri>/step-NNNNNNNN/.")
    every_steps: int = Field(50, ge=1, description="Checkpoint every this many optimizer steps.")
    every_minutes: float | None = Field(10, gt=0, description="Also checkpoint after this much wall time.")
    keep: int = Field(3, ge=1, le=1000, description="Newest verified checkpoints kept.")


class Output(ApiModel):
    uri: Uri = Field(description="Where the adapter, tokenizer, metrics and model card are uploaded.")
    merged_model: bool = Field(False, description="Also upload the base model with the adapter merged in.")


# What makes a run: its checkpoints only fit the same model, data, method, adapter shape
# and quantization. The trainer refuses checkpoints of another such set; a FineTuneJob
# cannot change them once created. (Training settings may change between attempts.)
RUN_FIELDS = ("model", "dataset", "method", "lora", "quantization")


class TrainingConfig(ApiModel):
    """Everything the trainer needs, nothing about pods."""

    model: ModelSource = Field(description="The base model: a Hub id or an HF-format folder.")
    dataset: Dataset = Field(
        description="The training data and how a record becomes a prompt and a response."
    )
    method: Method = Field(
        Method.qlora,
        description="qlora: the frozen base model in 4 bits (see quantization); lora: in the compute dtype.",
    )
    lora: Lora = Field(default_factory=Lora, description="The trained low-rank adapters.")
    quantization: Quantization = Field(
        default_factory=Quantization, description="How the base model is quantized (method qlora)."
    )
    training: Training = Field(default_factory=Training, description="The optimization.")
    checkpoint: Checkpoint = Field(
        description="Where and how often checkpoints go; every attempt resumes from the newest verified one."
    )
    output: Output = Field(description="Where the trained adapter goes.")


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(text: str, environ) -> str:
    """${VAR} in a local config file (e.g. file://${PWD}/runs/...): URIs must be absolute,
    and a shared example cannot know where it was checked out. Undefined is an error."""

    def sub(m: re.Match) -> str:
        if m.group(1) not in environ:
            raise ValueError(f"the config uses ${{{m.group(1)}}}, which is not set")
        return environ[m.group(1)]

    return _VAR.sub(sub, text)


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> TrainingConfig:
    """From a JSON/YAML file (a whole FineTuneJob or just its training part), or from
    the KUBETUNE_CONFIG environment variable holding JSON."""
    environ = os.environ if environ is None else environ
    if path is not None:
        text = expand_vars(Path(path).read_text(), environ)
        import yaml  # a JSON document is YAML too

        data: Any = yaml.safe_load(text)
    elif CONFIG_ENV in environ:
        data = json.loads(environ[CONFIG_ENV])
    else:
        raise ValueError(f"no config: pass a file or set {CONFIG_ENV}")
    if isinstance(data, dict) and data.get("kind") == "FineTuneJob":
        # a whole job: its pod-level fields (resources, spot, ...) are the operator's
        spec = data.get("spec") or {}
        data = {k: v for k, v in spec.items() if k in _WIRE_NAMES}
    return TrainingConfig.model_validate(data)


_WIRE_NAMES = {f.alias or name for name, f in TrainingConfig.model_fields.items()}
