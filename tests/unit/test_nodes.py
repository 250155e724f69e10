"""The dev cluster's node pools look like the real ones the operator targets."""

from __future__ import annotations

from kubetune_dev.devcluster.nodes import (
    GKE_SPOT_LABEL,
    INTEL_I915,
    KWOK_NODE_ANNOTATION,
    NVIDIA_GPU,
    RUNNER_LABEL,
    default_nodes,
    node_manifest,
)


def by_name():
    return {n.name: n for n in default_nodes()}


def test_pools():
    nodes = by_name()
    a100 = [n for n in nodes.values() if n.labels.get("nvidia.com/gpu.product") == "NVIDIA-A100-SXM4-80GB"]
    spot_a100 = [n for n in a100 if n.labels.get(GKE_SPOT_LABEL)]
    assert len(spot_a100) == 2
    for n in spot_a100:
        assert n.capacity[NVIDIA_GPU] == "8"
        assert n.labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
        assert n.labels["nvidia.com/gpu.memory"] == "81920"
        assert {"key": GKE_SPOT_LABEL, "value": "true", "effect": "NoSchedule"} in n.taints
    on_demand = [n for n in a100 if not n.labels.get(GKE_SPOT_LABEL)]
    assert len(on_demand) == 1
    t4 = [n for n in nodes.values() if n.labels.get("nvidia.com/gpu.product") == "Tesla-T4"]
    assert (
        len(t4) == 1
        and t4[0].labels[GKE_SPOT_LABEL] == "true"
        and t4[0].labels["nvidia.com/gpu.memory"] == "15360"
    )
    intel = [n for n in nodes.values() if n.capacity.get(INTEL_I915)]
    assert len(intel) == 1 and intel[0].labels["intel.feature.node.kubernetes.io/gpu"] == "true"
    cpu_only = [
        n
        for n in nodes.values()
        if not n.runner and NVIDIA_GPU not in n.capacity and INTEL_I915 not in n.capacity
    ]
    assert len(cpu_only) == 1
    runners = [n for n in nodes.values() if n.runner]
    assert len(runners) >= 2 and any(n.labels.get(GKE_SPOT_LABEL) for n in runners)
    assert any(not n.labels.get(GKE_SPOT_LABEL) for n in runners)


def test_only_fake_nodes_are_left_to_kwok():
    for n in default_nodes():
        m = node_manifest(n)
        assert (m["metadata"]["annotations"].get(KWOK_NODE_ANNOTATION) == "fake") == (not n.runner)
        if n.runner:
            assert m["metadata"]["labels"][RUNNER_LABEL] == "true"
            assert any(t["key"] == RUNNER_LABEL for t in m["spec"]["taints"])
        assert m["status"]["allocatable"] == m["status"]["capacity"]
