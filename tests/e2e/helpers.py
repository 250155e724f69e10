"""Helpers shared by the end-to-end tests: the tiny model and the data in the dev
cluster's MinIO, a job that trains it on the pod runner's nodes, and what its status and
logs show."""

from __future__ import annotations

from pathlib import Path

from kubernetes import client

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune_dev.devcluster.minio import upload_tree
from kubetune_dev.devcluster.nodes import RUNNER_LABEL
from tests.helpers import SQL_DATA, finetune_job, train_events, wait_for

RUNNER = {
    "nodeSelector": {RUNNER_LABEL: "true"},
    "tolerations": [{"key": RUNNER_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
}
STEPS, EVERY = 80, 10


def upload_tiny_model_and_data(s3, model: Path) -> str:
    """The tiny model and the shipped text-to-SQL data into the dev cluster's MinIO."""
    for bucket in ("e2e-models", "e2e-data", "e2e-runs"):
        s3.create_bucket(Bucket=bucket)
    upload_tree(s3, "e2e-models", "tiny", model)
    upload_tree(s3, "e2e-data", "sql", SQL_DATA)
    return "s3://e2e-models/tiny/"


def e2e_job(name: str, namespace: str, model_uri: str, endpoint: str, **spec) -> dict:
    """A FineTuneJob that trains the tiny model on the shipped data for real, in the dev
    cluster (its MinIO at `endpoint`), on the pod runner's nodes, spot; `spec` replaces
    top-level fields."""
    body = {
        "model": {"uri": model_uri},
        "dataset": {
            "uri": "s3://e2e-data/sql/train/",
            "template": "text-to-sql",
            "maxSeqLength": 256,
            "validation": {"uri": "s3://e2e-data/sql/eval/"},
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        # not auto: its bf16 probe can choose differently for two runs compared with each
        # other on a busy machine
        "quantization": {"computeDtype": "float32"},
        "training": {
            "maxSteps": STEPS,
            "batchSize": 4,
            "gradientAccumulation": 2,
            "learningRate": 1e-3,
            "loggingSteps": 1,
        },
        "checkpoint": {
            "uri": f"s3://e2e-runs/{namespace}/{name}/ckpt/",
            "everySteps": EVERY,
            "keep": 2,
            "everyMinutes": None,
        },
        "output": {"uri": f"s3://e2e-runs/{namespace}/{name}/out/"},
        "resources": {"accelerator": "cpu", "cpu": "500m", "memory": "2Gi"},
        "spot": {"enabled": True},
        "storage": {"secretRef": {"name": "s3"}, "endpoint": endpoint},
        "podOverrides": RUNNER,
        "terminationGracePeriodSeconds": 30,
    }
    return finetune_job(name, body, **spec)


def status(custom, ns, name) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}


def wait_status(custom, ns, name, pred, timeout_s, what) -> dict:
    return wait_for(
        lambda: (st := status(custom, ns, name)) and pred(st) and st, timeout_s, what, interval_s=0.2
    )


def pod_log(dev_cluster, ns: str, pod: str) -> str:
    """The trainer's output, also after its pod is gone (the dev cluster keeps node logs)."""
    return dev_cluster.pod_log(ns, pod)


def resumed_step(log: str) -> int:
    """The step a trainer's log says it resumed from."""
    return int(log.split("resumed from ")[1].split("(step ")[1].split(")")[0])


def trained_steps(log: str) -> list[int]:
    """The steps of a trainer's "train" log events, in order."""
    return [event["step"] for event in train_events(log)]


def adapter(s3, ns: str, name: str) -> dict:
    from safetensors.torch import load

    body = s3.get_object(Bucket="e2e-runs", Key=f"{ns}/{name}/out/adapter_model.safetensors")["Body"].read()
    return load(body)


def evict(core, ns: str, pod: str) -> str:
    """kubectl drain, for one pod: cordon its node, then the Eviction API (grace period kept)."""
    node = core.read_namespaced_pod(pod, ns).spec.node_name
    core.patch_node(node, {"spec": {"unschedulable": True}})
    core.create_namespaced_pod_eviction(
        pod, ns, client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=ns))
    )
    return node


def assert_stop_checkpoint(log: str, stopped: int, every: int) -> None:
    """The trainer's log shows the checkpoint of the step it stopped at as committed: its
    SIGTERM checkpoint, or, when the stop fell on a periodic checkpoint's step, that one
    (the trainer does not save a step twice)."""
    if stopped % every == 0:
        assert f"checkpoint step {stopped} committed" in log
        assert f"checkpoint of step {stopped} was already committed" in log
    else:
        assert f"checkpoint of step {stopped} committed" in log
