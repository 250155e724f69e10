"""Fake nodes of the dev cluster, labelled, tainted and sized like real GPU pool nodes.

kwok pretends to be the kubelet of the "fake" ones; the "runner" ones are real kubelets on
containerd (kubelets.py) that run their pods in the project's images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
RUNNER_LABEL = "kubetune.dev/pod-runner"  # selects nodes whose pods really run
GKE_SPOT_LABEL = "cloud.google.com/gke-spot"
NVIDIA_GPU = "nvidia.com/gpu"
INTEL_I915 = "gpu.intel.com/i915"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()
    capacity: dict[str, str] = field(default_factory=dict)
    runner: bool = False  # True: a real kubelet, not kwok
    fake_gpus: int = 0  # runner nodes: nvidia.com/gpu advertised by the fake device plugin


BASE_CAPACITY = {"cpu": "96", "memory": "1024Gi", "pods": "110", "ephemeral-storage": "1Ti"}

A100_80GB_LABELS = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
    "nvidia.com/gpu.memory": "81920",
    "nvidia.com/gpu.count": "8",
    "nvidia.com/gpu.family": "ampere",
}
# GKE puts this taint on GPU pools; ExtendedResourceToleration (enabled in the dev
# API server, as on GKE) tolerates it for pods that request the resource.
NVIDIA_TAINT = {"key": NVIDIA_GPU, "value": "present", "effect": "NoSchedule"}
SPOT_TAINT = {"key": GKE_SPOT_LABEL, "value": "true", "effect": "NoSchedule"}
RUNNER_TAINT = {"key": RUNNER_LABEL, "value": "true", "effect": "NoSchedule"}


def _labels(name: str, instance_type: str, extra: dict[str, str]) -> dict[str, str]:
    return {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": instance_type,
        **extra,
    }


def default_nodes() -> list[NodeSpec]:
    """The node pools every dev cluster starts with."""
    nodes = [
        NodeSpec(
            name=f"gpu-a100-spot-{i}",
            labels=_labels(
                f"gpu-a100-spot-{i}",
                "a2-ultragpu-8g",
                {GKE_SPOT_LABEL: "true", **A100_80GB_LABELS},
            ),
            taints=(SPOT_TAINT, NVIDIA_TAINT),
            capacity={**BASE_CAPACITY, "cpu": "96", "memory": "1360Gi", NVIDIA_GPU: "8"},
        )
        for i in range(2)
    ]
    nodes.append(
        NodeSpec(
            name="gpu-t4-spot-0",
            labels=_labels(
                "gpu-t4-spot-0",
                "n1-standard-16-t4",
                {
                    GKE_SPOT_LABEL: "true",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": "Tesla-T4",
                    "nvidia.com/gpu.memory": "15360",
                    "nvidia.com/gpu.count": "4",
                    "nvidia.com/gpu.family": "turing",
                },
            ),
            taints=(SPOT_TAINT, NVIDIA_TAINT),
            capacity={**BASE_CAPACITY, "cpu": "16", "memory": "60Gi", NVIDIA_GPU: "4"},
        )
    )
    nodes.append(
        NodeSpec(
            name="gpu-a100-ondemand-0",
            labels=_labels("gpu-a100-ondemand-0", "a2-ultragpu-8g", {**A100_80GB_LABELS}),
            taints=(NVIDIA_TAINT,),
            capacity={**BASE_CAPACITY, "cpu": "96", "memory": "1360Gi", NVIDIA_GPU: "8"},
        )
    )
    nodes.append(
        NodeSpec(
            name="gpu-intel-max-0",
            labels=_labels(
                "gpu-intel-max-0",
                "intel-max-1100",
                {
                    "intel.feature.node.kubernetes.io/gpu": "true",
                    "gpu.intel.com/product": "Intel_Data_Center_GPU_Max_1100",
                    "gpu.intel.com/memory.max": "51539607552",
                    "gpu.intel.com/device-id.0380-0bda.present": "true",
                },
            ),
            capacity={**BASE_CAPACITY, "cpu": "48", "memory": "512Gi", INTEL_I915: "4"},
        )
    )
    nodes.append(
        NodeSpec(
            name="cpu-0",
            labels=_labels("cpu-0", "n2-standard-16", {}),
            capacity={**BASE_CAPACITY, "cpu": "16", "memory": "64Gi"},
        )
    )
    # Runner nodes: tainted so that only pods meant to really run (they tolerate the
    # taint and select the label) land there; two spot, one on-demand, which also has two
    # (fake) NVIDIA GPUs through a device plugin, allocated by the kubelet.
    for i, spot in enumerate((True, True, False)):
        name = f"runner-{i}"
        extra = {RUNNER_LABEL: "true", **({GKE_SPOT_LABEL: "true"} if spot else {})}
        nodes.append(
            NodeSpec(
                name=name,
                labels=_labels(name, "dev-runner", extra),
                taints=(RUNNER_TAINT, *((SPOT_TAINT,) if spot else ())),
                capacity={**BASE_CAPACITY, "cpu": "16", "memory": "64Gi"},
                runner=True,
                fake_gpus=0 if spot else 2,
            )
        )
    return nodes


def node_manifest(spec: NodeSpec) -> dict:
    """The Node object to create. kwok nodes get their status from kwok's stages;
    runner nodes get a Ready status from the runner."""
    annotations = {} if spec.runner else {KWOK_NODE_ANNOTATION: "fake"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": dict(spec.labels), "annotations": annotations},
        "spec": {"taints": [copy.deepcopy(t) for t in spec.taints]},
        "status": {"capacity": dict(spec.capacity), "allocatable": dict(spec.capacity)},
    }
