"""The dev cluster is a real Kubernetes: the real scheduler places GPU pods by extended
resources, taints and labels; the API server enforces structural CRD schemas; the
controller-manager garbage-collects; the pod runner runs pods as real processes."""

from __future__ import annotations

import json
import signal
import textwrap
import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune.devcluster.nodes import GKE_SPOT_LABEL, INTEL_I915, NVIDIA_GPU, RUNNER_LABEL
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


# -- the pod runner: real processes --------------------------------------------------------


HOLD = "kubetune.dev/test-hold"  # keeps a deleted pod readable until the test lets go


def runner_pod(name: str, script: str, grace_s: int = 30, env=(), hold: bool = False) -> dict:
    return {
        "metadata": {"name": name, "labels": {"app": "runner-test"}, "finalizers": [HOLD] if hold else []},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": grace_s,
            "nodeSelector": {RUNNER_LABEL: "true"},
            "tolerations": [RUNNER_TOLERATION, SPOT_TOLERATION],
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11",
                    "command": ["python", "-c", textwrap.dedent(script)],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        *env,
                    ],
                }
            ],
        },
    }


def phase(core, namespace, name):
    return core.read_namespaced_pod(name, namespace).status.phase


def test_runner_pod_runs_for_real_and_reports_exit_and_termination_message(core, namespace, tmp_path):
    go = tmp_path / "go"
    script = """
        import json, os, pathlib, socket, time
        # bind to the pod IP, as a server in a pod would
        s = socket.socket(); s.bind((os.environ["POD_IP"], 0)); s.close()
        while not pathlib.Path(os.environ["GO_FILE"]).exists():
            time.sleep(0.05)
        msg = {k: os.environ[k] for k in ("POD_NAME", "POD_IP", "NODE_NAME")}
        msg["pid"] = os.getpid()
        pathlib.Path("/dev/termination-log").write_text(json.dumps(msg))
        raise SystemExit(int(os.environ["EXIT_CODE"]))
    """
    for name, code in (("ok", 0), ("fails", 3)):
        core.create_namespaced_pod(
            namespace,
            runner_pod(
                name,
                script,
                env=[{"name": "GO_FILE", "value": str(go)}, {"name": "EXIT_CODE", "value": str(code)}],
            ),
        )
    for name in ("ok", "fails"):
        wait_for(lambda n=name: phase(core, namespace, n) == "Running", 30, f"{name} Running")
    running = core.read_namespaced_pod("ok", namespace)
    assert running.status.pod_ip.startswith("127.0.") and running.status.pod_ip != "127.0.0.1"
    assert running.status.container_statuses[0].state.running is not None
    go.touch()

    for name, code, want in (("ok", 0, "Succeeded"), ("fails", 3, "Failed")):
        wait_for(lambda n=name, w=want: phase(core, namespace, n) == w, 30, f"{name} {want}")
        pod = core.read_namespaced_pod(name, namespace)
        term = pod.status.container_statuses[0].state.terminated
        assert term.exit_code == code
        assert term.reason == ("Completed" if code == 0 else "Error")
        msg = json.loads(term.message)
        assert msg["POD_NAME"] == name
        assert msg["POD_IP"] == pod.status.pod_ip
        assert msg["NODE_NAME"] == pod.spec.node_name
        assert pod.status.container_statuses[0].container_id == f"runner://{msg['pid']}"


def test_deleting_a_runner_pod_sends_sigterm_then_sigkill_after_grace(core, namespace, tmp_path):
    marks = tmp_path / "marks"
    script = """
        import os, pathlib, signal, time
        marks = pathlib.Path(os.environ["MARKS"])
        def on_term(*_):
            with marks.open("a") as f:
                f.write(f"SIGTERM {time.monotonic()}\\n")
        signal.signal(signal.SIGTERM, on_term)   # and keep running: only SIGKILL ends us
        marks.write_text("started\\n")
        while True:
            time.sleep(0.05)
    """
    core.create_namespaced_pod(
        namespace,
        runner_pod("stubborn", script, grace_s=2, hold=True, env=[{"name": "MARKS", "value": str(marks)}]),
    )
    wait_for(lambda: "started" in marks.read_text(), 30, "the process to start")
    deleted_at = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)
    final = wait_for(lambda: _terminated(core, namespace, "stubborn"), 30, "the final container status")
    killed_after = time.monotonic() - deleted_at
    term_lines = [line for line in marks.read_text().splitlines() if line.startswith("SIGTERM")]
    assert len(term_lines) == 1, "SIGTERM first, exactly once"
    assert final.exit_code == 128 + signal.SIGKILL, "then SIGKILL"
    assert killed_after >= 2, "not before the grace period is over"
    core.patch_namespaced_pod("stubborn", namespace, {"metadata": {"finalizers": None}})
    wait_for(lambda: _gone(core, namespace, "stubborn"), 30, "the pod object to be removed")


def test_a_pod_that_exits_on_sigterm_reports_its_own_exit_code(core, namespace, tmp_path):
    started = tmp_path / "started"
    script = """
        import os, pathlib, signal, sys, time
        def on_term(*_):
            pathlib.Path("/dev/termination-log").write_text('{"outcome": "preempted"}')
            sys.exit(75)
        signal.signal(signal.SIGTERM, on_term)
        pathlib.Path(os.environ["STARTED"]).touch()
        while True:
            time.sleep(0.05)
    """
    core.create_namespaced_pod(
        namespace,
        runner_pod("polite", script, grace_s=30, hold=True, env=[{"name": "STARTED", "value": str(started)}]),
    )
    wait_for(lambda: started.exists(), 30, "the process to start")
    core.delete_namespaced_pod("polite", namespace)
    final = wait_for(lambda: _terminated(core, namespace, "polite"), 20, "the final container status")
    assert final.exit_code == 75
    assert json.loads(final.message) == {"outcome": "preempted"}
    core.patch_namespaced_pod("polite", namespace, {"metadata": {"finalizers": None}})
    wait_for(lambda: _gone(core, namespace, "polite"), 30, "the pod object to be removed")


def _terminated(core, namespace, name):
    try:
        pod = core.read_namespaced_pod(name, namespace)
    except ApiException:
        return None
    statuses = pod.status.container_statuses or []
    return statuses and statuses[0].state.terminated


def _gone(core, namespace, name):
    try:
        core.read_namespaced_pod(name, namespace)
        return False
    except ApiException as e:
        return e.status == 404


def test_s3_put_and_get(s3):
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="data/shard-0.jsonl", Body=b'{"q": "select 1"}\n')
    assert s3.get_object(Bucket=bucket, Key="data/shard-0.jsonl")["Body"].read() == b'{"q": "select 1"}\n'
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="data/")["Contents"]]
    assert keys == ["data/shard-0.jsonl"]


def test_mount_namespace_keeps_sources_that_a_volume_covers(tmp_path):
    """A volume mounted on /tmp must not hide what is bound after it from under /tmp (the
    checkout, in CI clones): sources are opened first and mounted without canonicalizing."""
    import subprocess

    from kubetune.devcluster.podrunner import PodRunner, can_use_mount_namespaces

    if not can_use_mount_namespaces():
        pytest.skip("no mount namespaces here")
    assert str(tmp_path).startswith("/tmp/")
    volume, tree = tmp_path / "volume", tmp_path / "tree"
    volume.mkdir()
    tree.mkdir()
    (tree / "marker.txt").write_text("still here")
    binds = [(volume, "/tmp"), (tree, str(tree))]
    argv = PodRunner._in_mount_ns(binds, "/", ["cat", str(tree / "marker.txt")], cwd_first=False)
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "still here", out.stderr
