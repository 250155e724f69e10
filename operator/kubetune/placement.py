"""Pure placement rules: which resources a worker pod asks for, which nodes it may use
(accelerator, GPU product and memory, spot or on-demand) and which taints it tolerates."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune.api import Accelerator, FineTuneJobSpec

NVIDIA_GPU = "nvidia.com/gpu"
INTEL_GPU_PREFIX = "gpu.intel.com/"
NVIDIA_PRODUCT_LABEL = "nvidia.com/gpu.product"
NVIDIA_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, from GPU Feature Discovery
INTEL_GPU_LABEL = "intel.feature.node.kubernetes.io/gpu"
INTEL_PRODUCT_LABEL = "gpu.intel.com/product"

# How each cloud marks spot capacity: (label, value) and the taint it may carry.
SPOT_LABELS = (
    ("cloud.google.com/gke-spot", "true"),
    ("cloud.google.com/gke-preemptible", "true"),
    ("karpenter.sh/capacity-type", "spot"),
    ("eks.amazonaws.com/capacityType", "SPOT"),
    ("kubernetes.azure.com/scalesetpriority", "spot"),
)
SPOT_TOLERATIONS = (
    {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
    {"key": "cloud.google.com/gke-preemptible", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
    {
        "key": "kubernetes.azure.com/scalesetpriority",
        "operator": "Equal",
        "value": "spot",
        "effect": "NoSchedule",
    },
    {"key": "karpenter.sh/capacity-type", "operator": "Equal", "value": "spot", "effect": "NoSchedule"},
)


@dataclass
class Placement:
    requests: dict[str, str]
    limits: dict[str, str]
    node_selector: dict[str, str] = field(default_factory=dict)
    required_terms: list[dict] = field(default_factory=list)  # ANDed match expressions
    preferred: list[dict] = field(default_factory=list)
    tolerations: list[dict] = field(default_factory=list)

    def affinity(self) -> dict | None:
        node_affinity: dict = {}
        if self.required_terms:
            node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
                "nodeSelectorTerms": [{"matchExpressions": self.required_terms}]
            }
        if self.preferred:
            node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = self.preferred
        return {"nodeAffinity": node_affinity} if node_affinity else None


def gpu_resource(spec: FineTuneJobSpec) -> str | None:
    acc = spec.resources.accelerator
    if acc == Accelerator.nvidia.value:
        return NVIDIA_GPU
    if acc == Accelerator.intel.value:
        return INTEL_GPU_PREFIX + spec.resources.intel_resource
    return None


def require_on_demand(spec: FineTuneJobSpec, preemptions: int) -> bool:
    """Jobs that did not ask for spot never run there; spot jobs move to on-demand
    capacity after onDemandAfterPreemptions preemptions."""
    after = spec.spot.on_demand_after_preemptions
    return not spec.spot.enabled or (after is not None and preemptions >= after)


def place(spec: FineTuneJobSpec, preemptions: int = 0) -> Placement:
    """Where the workers of the next attempt may run, given the preemptions so far."""
    res = spec.resources
    requests = {"cpu": res.cpu, "memory": res.memory}
    limits = {"memory": res.memory}
    p = Placement(requests=requests, limits=limits)
    gpu = gpu_resource(spec)
    if gpu:
        limits[gpu] = str(res.gpus)
        requests[gpu] = str(res.gpus)
        # device plugins' pools are often tainted with the resource name
        p.tolerations.append({"key": gpu, "operator": "Exists", "effect": "NoSchedule"})
    if res.accelerator == Accelerator.nvidia.value:
        if res.gpu_products:
            p.required_terms.append(
                {"key": NVIDIA_PRODUCT_LABEL, "operator": "In", "values": list(res.gpu_products)}
            )
        if res.min_gpu_memory_mib:
            # Gt compares integers: "greater than min - 1" is "at least min"
            p.required_terms.append(
                {"key": NVIDIA_MEMORY_LABEL, "operator": "Gt", "values": [str(res.min_gpu_memory_mib - 1)]}
            )
    elif res.accelerator == Accelerator.intel.value:
        p.required_terms.append({"key": INTEL_GPU_LABEL, "operator": "In", "values": ["true"]})
        if res.gpu_products:
            p.required_terms.append(
                {"key": INTEL_PRODUCT_LABEL, "operator": "In", "values": list(res.gpu_products)}
            )

    if require_on_demand(spec, preemptions):
        # every cloud's spot marker must be absent (NotIn also matches nodes without the label)
        for label, value in SPOT_LABELS:
            p.required_terms.append({"key": label, "operator": "NotIn", "values": [value]})
    else:
        p.tolerations.extend(dict(t) for t in SPOT_TOLERATIONS)
        p.preferred.extend(
            {"weight": 100, "preference": {"matchExpressions": [{"key": k, "operator": "In", "values": [v]}]}}
            for k, v in SPOT_LABELS
        )

    overrides = spec.pod_overrides
    p.node_selector.update(overrides.node_selector)
    p.tolerations.extend(t.model_dump(by_alias=True, exclude_none=True) for t in overrides.tolerations)
    return p
