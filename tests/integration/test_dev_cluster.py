"""The dev cluster is a real Kubernetes: the real scheduler places GPU pods by extended
resources, taints and labels; the API server enforces structural CRD schemas; the
controller-manager garbage-collects. Pods on the runner nodes (real kubelets): test_nodes.py."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune_dev.devcluster.nodes import GKE_SPOT_LABEL, INTEL_I915, NVIDIA_GPU, RUNNER_LABEL
from tests.helpers import wait_established, wait_for

pytestmark = pytest.mark.cluster

SPOT_TOLERATION = {"key": GKE_SPOT_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
RUNNER_TOLERATION = {"key": RUNNER_LABEL, "operator": "Exists", "effect": "NoSchedule"}


PREFER_SPOT = {
    "nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "preference": {
                    "matchExpressions": [{"key": GKE_SPOT_LABEL, "operator": "In", "values": ["true"]}]
                },
            }
        ]
    }
}


def gpu_pod(name: str, resources: dict, tolerations=(), affinity=None) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "affinity": affinity,
            "containers": [
                {
                    "name": "main",
                    "image": "trainer:dev",
                    "command": ["sleep", "infinity"],
                    "resources": {"limits": resources},
                }
            ],
            "tolerations": list(tolerations),
        },
    }


def bound_node(core, namespace: str, name: str, timeout_s: float = 30) -> dict:
    pod = wait_for(
        lambda: (p := core.read_namespaced_pod(name, namespace)).spec.node_name and p,
        timeout_s,
        f"pod {name} to be scheduled",
    )
    return core.read_node(pod.spec.node_name).metadata.labels


def test_eight_gpu_spot_pod_lands_on_a_spot_a100(core, namespace):
    # the toleration allows spot nodes; the preference (as the operator sets it) picks them
    core.create_namespaced_pod(namespace, gpu_pod("a100", {NVIDIA_GPU: "8"}, [SPOT_TOLERATION], PREFER_SPOT))
    labels = bound_node(core, namespace, "a100")
    assert labels[GKE_SPOT_LABEL] == "true"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    # kwok plays the kubelet of GPU nodes: the pod turns Running
    wait_for(lambda: core.read_namespaced_pod("a100", namespace).status.phase == "Running", 30, "Running")


def test_fake_pods_and_nodes_have_addresses_that_stay_on_the_machine(core, namespace, dev_cluster):
    """The operator asks every running pod for its progress, kwok's fake ones too: their
    addresses must lie on the cluster's own bridge (and on no link of it), never on a
    route off the machine, and clear of the real nodes' pod ranges."""
    import ipaddress
    import subprocess

    core.create_namespaced_pod(namespace, gpu_pod("addr", {NVIDIA_GPU: "1"}, [SPOT_TOLERATION]))
    pod = wait_for(
        lambda: (p := core.read_namespaced_pod("addr", namespace)).status.pod_ip and p, 30, "a pod IP"
    )
    network = dev_cluster.network
    fake = ipaddress.ip_network(network.fake_pod_cidr)
    node_ips = [
        a.address for a in core.read_node(pod.spec.node_name).status.addresses if a.type == "InternalIP"
    ]
    for ip in (pod.status.pod_ip, pod.status.host_ip, *node_ips):
        assert ipaddress.ip_address(ip) in network.subnet, ip
        route = subprocess.run(["ip", "route", "get", ip], capture_output=True, text=True, check=True).stdout
        assert f"dev {network.bridge}" in route and " via " not in route, route
    assert ipaddress.ip_address(pod.status.pod_ip) in fake
    for i in range(3):
        first, _ = network.pod_range(i)
        assert ipaddress.ip_address(first) not in fake


def test_gpu_pod_without_the_spot_toleration_stays_off_spot_nodes(core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("on-demand", {NVIDIA_GPU: "8"}))
    labels = bound_node(core, namespace, "on-demand")
    assert GKE_SPOT_LABEL not in labels
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"


def test_intel_gpu_pod_lands_on_the_intel_node(core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("xpu", {INTEL_I915: "1"}))
    labels = bound_node(core, namespace, "xpu")
    assert labels["intel.feature.node.kubernetes.io/gpu"] == "true"
    assert "nvidia.com/gpu.product" not in labels


def test_pod_asking_for_nine_gpus_stays_pending_unschedulable(core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("too-big", {NVIDIA_GPU: "9"}, [SPOT_TOLERATION]))

    def unschedulable():
        pod = core.read_namespaced_pod("too-big", namespace)
        return next(
            (
                c
                for c in pod.status.conditions or []
                if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            ),
            None,
        )

    cond = wait_for(unschedulable, 30, "an Unschedulable condition")
    assert "Insufficient nvidia.com/gpu" in cond.message
    pod = core.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending" and pod.spec.node_name is None


def test_structural_crd_rejects_invalid_objects(api_client, namespace):
    ext = client.ApiextensionsV1Api(api_client)
    group, plural = "test.kubetune.dev", f"widgets{uuid.uuid4().hex[:6]}"
    crd = {
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1] + "x", "kind": plural.capitalize()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas"],
                                    "properties": {"replicas": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    ext.create_custom_resource_definition(crd)
    try:
        wait_established(ext, crd["metadata"]["name"])
        custom = client.CustomObjectsApi(api_client)
        kind = crd["spec"]["names"]["kind"]

        def create(spec):
            return wait_for(
                lambda: _create_or_error(custom, group, namespace, plural, kind, spec),
                30,
                "the CRD to be served",
            )

        ok = create({"replicas": 2})
        assert ok["spec"]["replicas"] == 2
        for bad, field in (
            ({"replicas": 0}, "spec.replicas"),
            ({"replicas": "two"}, "spec.replicas"),
            ({}, "spec.replicas"),
        ):
            err = create(bad)
            assert isinstance(err, ApiException) and err.status == 422, err
            assert field in json.loads(err.body)["message"]
    finally:
        ext.delete_custom_resource_definition(crd["metadata"]["name"])


def _create_or_error(custom, group, namespace, plural, kind, spec):
    body = {"apiVersion": f"{group}/v1", "kind": kind, "metadata": {"generateName": "w-"}, "spec": spec}
    try:
        return custom.create_namespaced_custom_object(group, "v1", namespace, plural, body)
    except ApiException as e:
        if e.status == 404:  # not served yet: retry
            raise
        return e


def test_owned_child_is_garbage_collected(core, namespace):
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "child",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
                ],
            }
        },
    )
    core.delete_namespaced_config_map("owner", namespace)

    def child_gone():
        try:
            core.read_namespaced_config_map("child", namespace)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(child_gone, 60, "the controller-manager to collect the orphaned child")


def test_s3_put_and_get(s3):
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="data/shard-0.jsonl", Body=b'{"q": "select 1"}\n')
    assert s3.get_object(Bucket=bucket, Key="data/shard-0.jsonl")["Body"].read() == b'{"q": "select 1"}\n'
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="data/")["Contents"]]
    assert keys == ["data/shard-0.jsonl"]
