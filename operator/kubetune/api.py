"""FineTuneJob (kubetune.io/v1alpha1): the single source of truth of the API.

The CRD in crds/ and in the chart is generated from these models (kubetune.crd);
field descriptions become the CRD's descriptions and the reference in the README.
The training part is the trainer's own TrainingConfig, so both read one model."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from kubetune_trainer.config import ApiModel, TrainingConfig

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAME = "ftj"
# Pod names are <job>-a<attempt>-w<rank> and host names w<rank>.<job>: keep them in DNS limits.
MAX_NAME_LENGTH = 48

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


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
    gpus_per_worker: int | None = Field(
        None, ge=0, le=16, description="GPUs per worker pod (default 1 on GPUs; must be 0 or unset on cpu)."
    )
    gpu_products: list[str] = Field(
        default_factory=list,
        description="Acceptable GPU products, as the GPU Feature Discovery / Intel product label spells them.",
    )
    min_gpu_memory_mib: int = Field(
        0,
        ge=0,
        alias="minGpuMemoryMiB",
        description="Only nodes whose GPUs have at least this much memory (nvidia.com/gpu.memory).",
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
    region: str = Field("us-east-1", min_length=1, max_length=64)


class Toleration(ApiModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class PodOverrides(ApiModel):
    image: str | None = Field(None, min_length=1, description="Trainer image (default: by accelerator).")
    service_account_name: str | None = None
    priority_class_name: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJobSpec(TrainingConfig):
    resources: Resources = Field(default_factory=Resources)
    workers: int = Field(1, ge=1, le=256, description="Worker pods; each runs gpusPerWorker processes.")
    spot: Spot = Field(default_factory=Spot)
    storage: Storage = Field(default_factory=Storage)
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Application failures retried; preemptions are counted separately."
    )
    suspend: bool = Field(False, description="Delete the pods (after a checkpoint) and keep the job.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the job after this long.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished job after this."
    )
    termination_grace_period_seconds: int = Field(
        90, ge=1, le=3600, description="Time a preempted worker gets to commit its final checkpoint."
    )
    queue_name: str | None = Field(
        None, description="Kueue LocalQueue; pods then carry Kueue pod-group labels."
    )
    pod_overrides: PodOverrides = Field(default_factory=PodOverrides)


class Phase(str, Enum):
    pending = "Pending"
    running = "Running"
    preempted = "Preempted"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"


class Condition(ApiModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Progress(ApiModel):
    summary: str | None = Field(None, description="step/total (percent), for kubectl get.")
    step: int = 0
    total_steps: int = 0
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta: str | None = Field(None, description="Estimated time left, e.g. 1h2m.")
    updated_at: str | None = None


class CheckpointRef(ApiModel):
    step: int
    uri: str
    time: str | None = None


class AdapterRef(ApiModel):
    uri: str
    sha256: str | None = None
    size_bytes: int | None = None


class FineTuneJobStatus(ApiModel):
    phase: Phase | None = None
    reason: str | None = Field(None, description="Why the job is in its phase (CamelCase).")
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    progress: Progress | None = None
    attempt: int = Field(0, description="Current attempt number (1 based); 0 before the first.")
    preemptions: int = 0
    failures: int = 0
    last_checkpoint: CheckpointRef | None = None
    adapter: AdapterRef | None = None
    start_time: str | None = None
    attempt_start_time: str | None = Field(None, description="When the current attempt's pods were created.")
    completion_time: str | None = None
    observed_generation: int | None = None


class FineTuneJob(ApiModel):
    api_version: Literal["kubetune.io/v1alpha1"] = f"{GROUP}/{VERSION}"
    kind: Literal["FineTuneJob"] = KIND
    metadata: dict = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
