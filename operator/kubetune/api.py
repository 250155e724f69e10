"""FineTuneJob (kubetune.io/v1alpha1): the single source of truth of the API.

The CRD in crds/ and in the chart is generated from these models (devtools/kubetune_dev/crd.py);
field descriptions become the CRD's descriptions and the reference in the README.
The training part is the trainer's own TrainingConfig, so both read one model."""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator

from kubetune_trainer.config import ApiModel, TrainingConfig
from kubetune_trainer.library import AdapterSpec, Evaluation, Goodput, InitRecord

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAME = "ftj"
# Pod names are <job>-a<attempt>-w<rank> and host names w<rank>.<job>: keep them in DNS limits.
MAX_NAME_LENGTH = 48

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
# Kubernetes' own rules for what the pods carry, checked at admission so that a job the
# API server would refuse pods for is refused itself, with the field named.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
MAX_POD_LABELS = 64


AUTO = "auto"


def _gpu_memory_mib(value: object) -> int | str:
    # bool is an int to Python, not to the API server; "16384" is a string to both
    if value == AUTO or (type(value) is int and value >= 0):
        return value
    raise ValueError('must be "auto" or a whole number of MiB (0: any GPU)')


# An int-or-string, the Kubernetes way (like a Deployment's maxSurge): old specs' numbers
# keep their meaning, and the schema stays structural (no anyOf).
GpuMemoryMiB = Annotated[
    int | Literal["auto"],
    PlainValidator(_gpu_memory_mib),
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]


class Accelerator(str, Enum):
    nvidia = "nvidia"
    intel = "intel"
    cpu = "cpu"


class Resources(ApiModel):
    accelerator: Accelerator = Field(
        Accelerator.nvidia, description="GPU vendor to run on; cpu for tests and demos."
    )
    intel_resource: Literal["i915", "xe"] = Field(
        "i915", description="Intel device-plugin resource: gpu.intel.com/i915 or gpu.intel.com/xe."
    )
    intel_stack: Literal["xpu", "ipex-llm"] = Field(
        "xpu",
        description="Intel software stack: xpu (stock PyTorch XPU with bitsandbytes 4-bit, maintained) or "
        "ipex-llm (bigdl-llm/ipex-llm with intel-extension-for-pytorch, as the seed notebooks ran it; own image). "
        "With accelerator cpu, ipex-llm runs that stack on the CPU (4-bit sym_int4: it has no NF4 on CPU).",
    )
    gpus_per_worker: int | None = Field(
        None, ge=0, le=16, description="GPUs per worker pod (default 1 on GPUs; must be 0 or unset on cpu)."
    )
    gpu_products: list[str] = Field(
        default_factory=list,
        description="Acceptable GPU products, as the GPU Feature Discovery / Intel product label spells them.",
    )
    min_gpu_memory_mib: GpuMemoryMiB = Field(
        AUTO,
        alias="minGpuMemoryMiB",
        description="Only nodes whose GPUs have at least this much memory, in MiB. auto: the job's estimated "
        "need per GPU (`kubetune render` prints it; the model, quantization, LoRA rank, sequence length, batch "
        "and gradient checkpointing set it), and no constraint for a model the estimate does not know; nodes "
        "that publish no GPU memory label stay eligible. A number: nodes must publish enough (0: any GPU). "
        "Labels: nvidia.com/gpu.memory (GPU Feature Discovery, per GPU); on Intel gpu.intel.com/memory.max, "
        "the node's total, which must cover gpusPerWorker GPUs.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == int ? self >= 0 : self == 'auto'",
                    "message": 'must be "auto" or a whole number of MiB (0: any GPU)',
                }
            ]
        },
    )
    cpu: str = Field("4", pattern=QUANTITY_PATTERN, description="CPU request per worker pod.")
    memory: str = Field(
        "16Gi", pattern=QUANTITY_PATTERN, description="Memory request and limit per worker pod."
    )

    @model_validator(mode="after")
    def _gpus_match_accelerator(self) -> Resources:
        if self.accelerator == Accelerator.cpu.value and self.gpus_per_worker:
            raise ValueError("resources.gpusPerWorker must be 0 or unset with accelerator cpu")
        if self.accelerator != Accelerator.cpu.value and self.gpus_per_worker == 0:
            raise ValueError("resources.gpusPerWorker must be at least 1 on a GPU accelerator")
        return self

    @property
    def gpus(self) -> int:
        if self.accelerator == Accelerator.cpu.value:
            return 0
        return 1 if self.gpus_per_worker is None else self.gpus_per_worker

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.accelerator != 'cpu' || !has(self.gpusPerWorker) || self.gpusPerWorker == 0",
                    "message": "gpusPerWorker must be 0 or unset with accelerator cpu",
                },
                {
                    "rule": "self.accelerator == 'cpu' || !has(self.gpusPerWorker) || self.gpusPerWorker >= 1",
                    "message": "gpusPerWorker must be at least 1 on a GPU accelerator",
                },
            ]
        }
    )


class Spot(ApiModel):
    enabled: bool = Field(False, description="Prefer spot/preemptible nodes and tolerate their taints.")
    max_preemptions: int = Field(20, ge=0, description="Give up after this many preemptions.")
    on_demand_after_preemptions: int | None = Field(
        None, ge=1, description="After this many preemptions, require on-demand capacity."
    )
    standby: bool = Field(
        True,
        description="When a node of a single-worker job announces its reclaim, start the next attempt on "
        "other capacity during the notice, loaded and waiting, so the resume skips the start and model load.",
    )


class SecretRef(ApiModel):
    name: str = Field(min_length=1, max_length=253, description="A Secret in the job's namespace.")


class Storage(ApiModel):
    secret_ref: SecretRef | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optionally AWS_SESSION_TOKEN); "
        "the only way credentials reach the trainer.",
    )
    endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s/]+(/.*)?$", description="S3-compatible endpoint (MinIO, GCS, R2...)."
    )
    region: str = Field("us-east-1", min_length=1, max_length=64, description="S3 region.")


class Toleration(ApiModel):
    key: str | None = Field(
        None, max_length=317, description="Taint key; unset with operator Exists tolerates every taint."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Exists: any value; Equal (the default): the taint's value must match."
    )
    value: str | None = Field(None, max_length=63, description="Taint value, for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; unset tolerates every effect."
    )
    toleration_seconds: int | None = Field(
        None, description="How long a NoExecute taint is tolerated before eviction; unset: for ever."
    )

    @model_validator(mode="after")
    def _as_kubernetes_allows(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not set a value")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must have operator Exists")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                    "message": "a toleration with operator Exists must not set a value",
                },
                {
                    "rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                    "message": "a toleration without a key must have operator Exists",
                },
            ]
        }
    )


class PodOverrides(ApiModel):
    image: str | None = Field(None, min_length=1, description="Trainer image (default: by accelerator).")
    service_account_name: str | None = Field(
        None,
        description="ServiceAccount of the worker pods (default: no token mounted; the trainer needs none).",
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of the worker pods.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Added to the worker pods' node selector."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Added to the worker pods' tolerations."
    )
    labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        max_length=MAX_POD_LABELS,
        description="Added to the worker pods' labels (Kubernetes label keys and values).",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.all(k, k.size() <= 317 && k.matches(r'{LABEL_KEY}'))",
                    "message": "label keys must be Kubernetes qualified names ([prefix/]name, name up to 63 "
                    "characters of letters, digits, '-', '_', '.')",
                },
                {
                    "rule": f"self.all(k, self[k].matches(r'{LABEL_VALUE}'))",
                    "message": "label values must be up to 63 characters of letters, digits, '-', '_', '.', "
                    "starting and ending with a letter or digit",
                },
            ]
        },
    )

    @model_validator(mode="after")
    def _labels_as_kubernetes_allows(self) -> PodOverrides:
        for k, v in self.labels.items():
            if not re.match(LABEL_KEY, k) or len(k) > 317:
                raise ValueError(f"podOverrides.labels: {k!r} is not a Kubernetes label key")
            if not re.match(LABEL_VALUE, v) or len(v) > 63:
                raise ValueError(f"podOverrides.labels[{k!r}]: {v!r} is not a Kubernetes label value")
        return self

    annotations: dict[str, str] = Field(
        default_factory=dict, description="Added to the worker pods' annotations."
    )


# Inputs may be file:// (a model or data baked into a custom image); outputs may not.
LOCAL_OUTPUT_MESSAGE = (
    "spec.{field}.uri must be s3://: a file:// path is inside the pod, and what is written there "
    "is lost with it (file:// is for a local trainer run on one machine)"
)


class FineTuneJobSpec(TrainingConfig):
    resources: Resources = Field(
        default_factory=Resources, description="What each worker pod runs on and asks for."
    )
    workers: int = Field(1, ge=1, le=256, description="Worker pods; each runs gpusPerWorker processes.")
    spot: Spot = Field(default_factory=Spot, description="Spot (preemptible) capacity and its limits.")
    storage: Storage = Field(
        default_factory=Storage, description="S3 access for the dataset, model, checkpoints and adapter."
    )
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Application failures retried; preemptions are counted separately."
    )
    suspend: bool = Field(False, description="Delete the pods (after a checkpoint) and keep the job.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the job after this long.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished job after this."
    )
    progress_deadline_seconds: int | None = Field(
        None,
        ge=10,
        description="How long a training worker may go without finishing an optimizer step before "
        "its attempt is replaced as a failure (a hung collective, a stuck read); unset: 20 times "
        "its usual step time, at least 600; never under 6 of the operator's progress polls. Loading, "
        "checkpointing and evaluating never count.",
    )
    termination_grace_period_seconds: int = Field(
        90, ge=1, le=3600, description="Time a preempted worker gets to commit its final checkpoint."
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="Kueue LocalQueue; pods then carry Kueue pod-group labels (so it is a label value).",
    )
    pod_overrides: PodOverrides = Field(
        default_factory=PodOverrides, description="Settings added to the worker pods the operator creates."
    )

    @model_validator(mode="after")
    def _ipex_llm_on_cpu_trains_what_it_can(self) -> FineTuneJobSpec:
        """What ipex-llm's CPU path cannot do, refused at admission rather than in the pod
        after its 7 GB image is pulled (kubetune_trainer.model._load_ipex_llm)."""
        res = self.resources
        if res.accelerator != Accelerator.cpu.value or res.intel_stack != "ipex-llm":
            return self
        if self.method != "qlora":
            raise ValueError("resources.intelStack ipex-llm trains method qlora only (its low-bit base)")
        if self.output.merged_model:
            raise ValueError("output.mergedModel: resources.intelStack ipex-llm exports the adapter only")
        if self.quantization.compute_dtype not in ("auto", "float32"):
            raise ValueError(
                "quantization.computeDtype: ipex-llm on CPU computes in float32 only (use auto or float32)"
            )
        if self.workers > 1:
            raise ValueError(
                "resources.intelStack ipex-llm on cpu runs one worker (its multi-worker path is oneCCL on Intel GPUs)"
            )
        return self

    @model_validator(mode="after")
    def _outputs_outlive_the_pod(self) -> FineTuneJobSpec:
        for field, uri in (("checkpoint", self.checkpoint.uri), ("output", self.output.uri)):
            if uri.startswith("file:"):
                raise ValueError(LOCAL_OUTPUT_MESSAGE.format(field=field))
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"!self.{f}.uri.startsWith('file:')",
                    "message": LOCAL_OUTPUT_MESSAGE.format(field=f),
                }
                for f in ("checkpoint", "output")
            ]
        }
    )


class Phase(str, Enum):
    pending = "Pending"
    running = "Running"
    preempted = "Preempted"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"


class Condition(ApiModel):
    type: str = Field(description="Scheduled, Running, Suspended, Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(description="Why, in CamelCase.")
    message: str = Field("", description="Why, in words.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The spec generation it was computed from.")


class Progress(ApiModel):
    summary: str | None = Field(None, description="step/total (percent), for kubectl get.")
    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int = Field(0, description="Optimizer steps in all (training.maxSteps).")
    epoch: float | None = Field(None, description="Passes over the dataset so far.")
    loss: float | None = Field(None, description="Training loss at the last logged step.")
    eval_loss: float | None = Field(None, description="Validation loss at the last evaluation.")
    tokens_per_second: float | None = Field(None, description="Training throughput.")
    eta: str | None = Field(None, description="Estimated time left, e.g. 1h2m.")
    updated_at: str | None = Field(None, description="When the trainer last reported progress.")


class CheckpointRef(ApiModel):
    step: int = Field(description="The optimizer step it holds.")
    uri: str = Field(description="Its folder, <checkpoint.uri>/step-NNNNNNNN/.")
    time: str | None = Field(None, description="When it was committed.")


class AdapterRef(ApiModel):
    uri: str = Field(description="Where the adapter was uploaded.")
    sha256: str | None = Field(None, description="SHA-256 of the adapter's weights file.")
    size_bytes: int | None = Field(None, description="Size of the adapter's weights file.")
    name: str | None = Field(
        None, description="The Adapter object registering it in the library (kubectl get ad NAME)."
    )


class FineTuneJobStatus(ApiModel):
    phase: Phase | None = Field(None, description="Where the job is: Preempted waits for the next attempt.")
    reason: str | None = Field(None, description="Why the job is in its phase (CamelCase).")
    message: str | None = Field(None, description="Why, in words.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Kubernetes-style conditions, one per type."
    )
    progress: Progress | None = Field(None, description="The trainer's progress, polled from rank 0.")
    attempt: int = Field(0, description="Current attempt number (1 based); 0 before the first.")
    preemptions: int = Field(0, description="Attempts lost to preemption (limit: spot.maxPreemptions).")
    failures: int = Field(0, description="Attempts lost to application failures (limit: backoffLimit).")
    last_checkpoint: CheckpointRef | None = Field(
        None, description="The newest checkpoint the trainer committed."
    )
    adapter: AdapterRef | None = Field(None, description="The uploaded adapter, once the job succeeded.")
    evaluation: Evaluation | None = Field(
        None, description="The held-out evaluation of the finished adapter (dataset.validation)."
    )
    goodput: Goodput | None = Field(
        None,
        description="How much of the job's time became adapter, and where the rest went (the trainer's "
        "ledger, carried in its checkpoints).",
    )
    init_from: InitRecord | None = Field(
        None,
        description="The warm start's adapter as resolved when the job started (spec.lora.initFrom), pinned "
        "by its sha256 for every attempt.",
    )
    start_time: str | None = Field(None, description="When the first attempt's pods were created.")
    attempt_start_time: str | None = Field(None, description="When the current attempt's pods were created.")
    completion_time: str | None = Field(None, description="When the job succeeded or failed.")
    observed_generation: int | None = Field(None, description="The spec generation this status reflects.")


class FineTuneJob(ApiModel):
    api_version: Literal["kubetune.io/v1alpha1"] = f"{GROUP}/{VERSION}"
    kind: Literal["FineTuneJob"] = KIND
    metadata: dict = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


ADAPTER_KIND = "Adapter"
ADAPTER_PLURAL = "adapters"
ADAPTER_SHORT_NAME = "ad"
VERIFIED = "Verified"


class AdapterStatus(ApiModel):
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Verified: whether the adapter's weights in S3 still have the recorded sha256 (False: "
        "the object changed; it must not be served).",
    )
    verified_time: str | None = Field(None, description="When the sha256 was last checked.")


class Adapter(ApiModel):
    """A LoRA adapter in the library: registered by the operator when a FineTuneJob
    succeeds (and not owned by it), or imported from a bucket's adapter.json files."""

    api_version: Literal["kubetune.io/v1alpha1"] = f"{GROUP}/{VERSION}"
    kind: Literal["Adapter"] = ADAPTER_KIND
    metadata: dict = Field(default_factory=dict)
    spec: AdapterSpec
    status: AdapterStatus | None = None
