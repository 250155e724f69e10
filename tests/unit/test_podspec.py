"""The pod runner resolves env and commands the way the kubelet does."""

from __future__ import annotations

import pytest

from kubetune.devcluster import podspec

POD = {
    "metadata": {
        "name": "job-a0-w1",
        "namespace": "ml",
        "uid": "u-1",
        "labels": {"kubetune.io/rank": "1"},
        "annotations": {"note": "x"},
    },
    "spec": {"nodeName": "runner-0", "serviceAccountName": "trainer"},
    "status": {"podIP": "127.0.0.11", "podIPs": [{"ip": "127.0.0.11"}], "hostIP": "127.0.0.1"},
}
OBJECTS = {
    ("secret", "ml", "s3"): {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"},
    ("configmap", "ml", "cfg"): {"config.json": "{}", "MODE": "train"},
}


def lookup(kind, ns, name):
    return OBJECTS.get((kind, ns, name))


def test_expand_follows_kubernetes_rules():
    env = {"A": "1", "B": "two"}
    assert podspec.expand("$(A)-$(B)", env) == "1-two"
    assert podspec.expand("$(MISSING)", env) == "$(MISSING)"
    assert podspec.expand("$$(A)", env) == "$(A)"


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("metadata.name", "job-a0-w1"),
        ("metadata.namespace", "ml"),
        ("metadata.uid", "u-1"),
        ("metadata.labels['kubetune.io/rank']", "1"),
        ("metadata.annotations['note']", "x"),
        ("metadata.labels['absent']", ""),
        ("spec.nodeName", "runner-0"),
        ("status.podIP", "127.0.0.11"),
        ("status.hostIP", "127.0.0.1"),
        ("spec.serviceAccountName", "trainer"),
    ],
)
def test_field_refs(path, want):
    assert podspec.field_value(POD, path) == want


def test_unknown_field_ref_is_a_config_error():
    with pytest.raises(podspec.ConfigError, match="unsupported fieldRef"):
        podspec.field_value(POD, "spec.bogus")


def test_env_order_sources_and_expansion():
    container = {
        "name": "trainer",
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['kubetune.io/rank']"}}},
            {"name": "ADDR", "value": "$(POD_IP_BASE):$(RANK)"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}},
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}},
            },
        ],
        "resources": {"limits": {"cpu": "1500m", "memory": "2Gi"}},
    }
    env = podspec.container_env(POD, container, {"PATH": "/bin", "POD_IP_BASE": "h"}, lookup)
    assert env["CFG_MODE"] == "train" and env["CFG_config.json"] == "{}"
    assert env["RANK"] == "1"
    assert env["ADDR"] == "h:1"
    assert env["KEY"] == "AK"
    assert "OPT" not in env
    assert env["CPUS"] == "2"  # rounded up
    assert env["MEM_MI"] == "2048"  # requests fall back to limits
    assert env["PATH"] == "/bin"


@pytest.mark.parametrize(
    "ref",
    [
        {"secretKeyRef": {"name": "missing", "key": "k"}},
        {"secretKeyRef": {"name": "s3", "key": "missing"}},
        {"configMapKeyRef": {"name": "cfg", "key": "missing"}},
    ],
)
def test_missing_references_are_config_errors(ref):
    container = {"name": "c", "env": [{"name": "X", "valueFrom": ref}]}
    with pytest.raises(podspec.ConfigError, match="not found"):
        podspec.container_env(POD, container, {}, lookup)


def test_argv_needs_a_command_and_expands_args():
    assert podspec.container_argv(
        {"name": "c", "command": ["python", "-m", "x"], "args": ["--rank=$(R)"]}, {"R": "3"}
    ) == ["python", "-m", "x", "--rank=3"]
    with pytest.raises(podspec.ConfigError, match="set command"):
        podspec.container_argv({"name": "c", "args": ["x"]}, {})


def test_exit_codes_and_phases():
    assert podspec.exit_code(0) == 0
    assert podspec.exit_code(75) == 75
    assert podspec.exit_code(-9) == 137
    assert podspec.exit_code(-15) == 143
    assert podspec.final_phase([0, 0]) == "Succeeded"
    assert podspec.final_phase([0, 1]) == "Failed"


def test_terminated_state_and_fallback_message():
    state = podspec.terminated_state(1, "t0", "t1", "boom")
    assert state == {
        "exitCode": 1,
        "reason": "Error",
        "startedAt": "t0",
        "finishedAt": "t1",
        "message": "boom",
    }
    assert "message" not in podspec.terminated_state(0, "t0", "t1", "")
    log = "\n".join(f"line {i}" for i in range(200))
    msg = podspec.fallback_message(log)
    assert msg.endswith("line 199") and "line 119" not in msg and len(msg.encode()) <= 2048


def test_pods_with_hostname_and_subdomain_get_their_service_names_in_hosts():
    pod = {"metadata": {"namespace": "ns"}, "spec": {"hostname": "w0", "subdomain": "job"}}
    names = podspec.hosts_names(pod)
    assert names[0] == "w0.job.ns.svc.cluster.local" and "w0.job" in names
    assert podspec.hosts_names({"metadata": {"namespace": "ns"}, "spec": {"hostname": "w0"}}) == []
    text = podspec.hosts_file("127.0.0.1 localhost\n", {"127.0.0.12": names, "127.0.0.13": []})
    assert text.splitlines()[0] == "127.0.0.1 localhost"
    assert "127.0.0.12\tw0.job.ns.svc.cluster.local" in text and "127.0.0.13" not in text


@pytest.mark.parametrize(("cpu", "procs", "expected"), [("500m", 1, "1"), ("2", 1, "2"), ("8", 4, "2"), ("1", 4, "1")])
def test_each_trainer_process_gets_threads_for_its_share_of_the_pods_cpu(cpu, procs, expected):
    """Not the node's core count: two trainers on one node would oversubscribe it."""
    from kubetune.api import FineTuneJobSpec
    from kubetune.manifests import build_pod
    from kubetune_trainer.launch import process_env

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "m"},
            "dataset": {"uri": "s3://bkt/d/"},
            "checkpoint": {"uri": "s3://bkt/c/"},
            "output": {"uri": "s3://bkt/o/"},
            "resources": {"accelerator": "cpu", "cpu": cpu}
            if procs == 1
            else {"accelerator": "nvidia", "cpu": cpu, "gpusPerWorker": procs},
        }
    )
    pod = {**build_pod("j", "uid", spec, attempt=1, rank=0, preemptions=0), **{k: POD[k] for k in ("status",)}}
    pod["metadata"]["namespace"] = "ml"
    container = pod["spec"]["containers"][0]
    env = podspec.container_env(pod, container, {}, lookup)
    assert env["KUBETUNE_PROCS_PER_WORKER"] == str(procs)
    assert process_env(env, local_rank=0)["OMP_NUM_THREADS"] == expected


def test_a_divisor_the_api_server_stored_as_zero_means_one():
    container = {"resources": {"requests": {"cpu": "1500m"}}}
    assert podspec.resource_value(container, {"resource": "requests.cpu", "divisor": "0"}) == "2"
