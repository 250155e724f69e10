"""Pure placement rules: which resources a worker pod asks for, which nodes it may use
(accelerator, GPU product and memory, spot or on-demand) and which taints it tolerates."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune import memory
from kubetune.api import AUTO, Accelerator, FineTuneJobSpec

NVIDIA_GPU = "nvidia.com/gpu"
INTEL_GPU_PREFIX = "gpu.intel.com/"
NVIDIA_PRODUCT_LABEL = "nvidia.com/gpu.product"
NVIDIA_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, from GPU Feature Discovery
INTEL_GPU_LABEL = "intel.feature.node.kubernetes.io/gpu"
INTEL_PRODUCT_LABEL = "gpu.intel.com/product"
# bytes, the sum over the node's GPUs (Intel GPU plugin / NFD hook): a per-GPU need of
# M on N GPUs rules out nodes below N * M, a necessary condition only
INTEL_MEMORY_LABEL = "gpu.intel.com/memory.max"

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
    # the node must also match one of these (each ANDed with required_terms)
    required_any: list[list[dict]] = field(default_factory=list)
    preferred: list[dict] = field(default_factory=list)
    tolerations: list[dict] = field(default_factory=list)
    avoid_nodes: tuple[str, ...] = ()  # by name: nodes under a termination notice

    def affinity(self) -> dict | None:
        node_affinity: dict = {}
        terms = [self.required_terms + alt for alt in self.required_any] or [self.required_terms]
        # (a field selector takes one value per requirement: one NotIn per node, ANDed)
        avoid = [{"key": "metadata.name", "operator": "NotIn", "values": [n]} for n in self.avoid_nodes]
        if any(terms) or self.avoid_nodes:
            node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
                "nodeSelectorTerms": [
                    {
                        **({"matchExpressions": t} if t else {}),
                        **({"matchFields": avoid} if self.avoid_nodes else {}),
                    }
                    for t in terms
                ]
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


def min_gpu_memory(spec: FineTuneJobSpec) -> tuple[int, bool]:
    """The GPU memory (MiB) each GPU of a worker needs, 0 for any, and whether nodes must
    publish theirs: an explicit minGpuMemoryMiB is a hard requirement; auto is the
    estimate (none for an unknown model) and keeps unlabelled nodes eligible, so it
    narrows placement only where GPU memory is known to be too small."""
    value = spec.resources.min_gpu_memory_mib
    if value != AUTO:
        return value, True
    est = memory.estimate(spec)
    return (est.total_mib if est else 0), False


def gpu_memory_note(spec: FineTuneJobSpec) -> list[str]:
    """In words: the estimate and what minGpuMemoryMiB makes of it (for kubetune render)."""
    res = spec.resources
    if res.accelerator == Accelerator.cpu.value:
        return ["accelerator cpu: no GPU memory needed"]
    est = memory.estimate(spec)
    model = spec.model.name or spec.model.uri
    lines = [
        f"GPU memory estimate: {est.summary()}"
        if est
        else f"GPU memory estimate: none, {model} is not in kubetune.memory's table"
    ]
    mib, strict = min_gpu_memory(spec)
    label = NVIDIA_MEMORY_LABEL if res.accelerator == Accelerator.nvidia.value else INTEL_MEMORY_LABEL
    at_least = f"{mib} MiB" if label == NVIDIA_MEMORY_LABEL else f"{mib * memory.MIB * res.gpus} bytes"
    if not mib:
        lines.append(f"minGpuMemoryMiB {res.min_gpu_memory_mib}: any GPU memory")
    elif strict:
        lines.append(f"minGpuMemoryMiB {mib}: nodes whose {label} is at least {at_least}")
        if est and mib < est.total_mib:
            lines.append("minGpuMemoryMiB is below the estimate: the trainer may run out of GPU memory")
    else:
        lines.append(
            f"minGpuMemoryMiB auto: nodes whose {label} is at least {at_least}, or that have no such label"
        )
    return lines


def _memory_terms(p: Placement, label: str, at_least: int, strict: bool) -> None:
    # Gt compares integers: "greater than min - 1" is "at least min"
    enough = {"key": label, "operator": "Gt", "values": [str(at_least - 1)]}
    if strict:
        p.required_terms.append(enough)
    else:
        p.required_any = [[enough], [{"key": label, "operator": "DoesNotExist"}]]


def require_on_demand(spec: FineTuneJobSpec, preemptions: int) -> bool:
    """Jobs that did not ask for spot never run there; spot jobs move to on-demand
    capacity after onDemandAfterPreemptions preemptions."""
    after = spec.spot.on_demand_after_preemptions
    return not spec.spot.enabled or (after is not None and preemptions >= after)


def place(spec: FineTuneJobSpec, preemptions: int = 0, avoid_nodes=()) -> Placement:
    """Where the workers of the next attempt may run, given the preemptions so far and
    the nodes under a termination notice (kubetune.notices): most notices are NoSchedule
    taints the scheduler heeds anyway; Azure's is a node condition it does not read."""
    res = spec.resources
    requests = {"cpu": res.cpu, "memory": res.memory}
    limits = {"memory": res.memory}
    p = Placement(requests=requests, limits=limits, avoid_nodes=tuple(sorted(avoid_nodes)))
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
        mib, strict = min_gpu_memory(spec)
        if mib:
            _memory_terms(p, NVIDIA_MEMORY_LABEL, mib, strict)
    elif res.accelerator == Accelerator.intel.value:
        p.required_terms.append({"key": INTEL_GPU_LABEL, "operator": "In", "values": ["true"]})
        if res.gpu_products:
            p.required_terms.append(
                {"key": INTEL_PRODUCT_LABEL, "operator": "In", "values": list(res.gpu_products)}
            )
        mib, strict = min_gpu_memory(spec)
        if mib:
            _memory_terms(p, INTEL_MEMORY_LABEL, mib * memory.MIB * res.gpus, strict)

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
