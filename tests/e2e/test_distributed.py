"""One FineTuneJob across several worker pods, end to end: the real operator creates the
workers behind a headless Service, holds them at a scheduling gate until all fit, and
the trainer image's processes under the runner nodes' kubelets train with gloo over the
pods' own addresses (w0.<job> resolved by the cluster's CoreDNS)."""

from __future__ import annotations

import json
import random
import re

import pytest

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.gang import GANG_GATE
from kubetune_dev.devcluster.nodes import NodeSpec, node_manifest
from tests.e2e.helpers import (
    adapter,
    assert_stop_checkpoint,
    e2e_job,
    evict,
    pod_log,
    status,
    wait_status,
)
from tests.helpers import empty_namespace, make_namespace, wait_for
from tests.trainer.conftest import max_abs_diff

pytestmark = pytest.mark.cluster

# the stop lands in the first third of the run: the status shows a step a second or two after
# the trainer took it, and the eviction takes the kubelet another second to deliver, so the
# last two thirds (~10 s of steps here) are the margin that keeps the SIGTERM inside training
STEPS, EVERY = 36, 4


def dp_job(name, namespace, model, endpoint, workers: int) -> dict:
    """The same global batch (8 sequences a step) over 1 or 2 workers; LoRA dropout off,
    since its masks are drawn per rank; float32 compute, so that the summation order is the
    only difference (computeDtype auto picks bf16 on CPUs with AMX, whose rounding of a
    differently split batch moved the adapter by 1.3e-4)."""
    job = e2e_job(name, namespace, model, endpoint, workers=workers)
    job["spec"]["quantization"] = {"computeDtype": "float32"}
    job["spec"]["training"].update(maxSteps=STEPS, batchSize=4 // workers, gradientAccumulation=2)
    job["spec"]["lora"]["dropout"] = 0.0
    job["spec"]["checkpoint"]["everySteps"] = EVERY
    return job


def create(custom, namespace, job) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)


def finished(custom, namespace, name, timeout_s=420) -> dict:
    return wait_status(
        custom,
        namespace,
        name,
        lambda s: s.get("phase") in ("Succeeded", "Failed"),
        timeout_s,
        f"{name} to end",
    )


def loss_history(s3, ns: str, name: str) -> list:
    body = s3.get_object(Bucket="e2e-runs", Key=f"{ns}/{name}/out/metrics.json")["Body"].read()
    return json.loads(body)["history"]


def events(core, ns: str, name: str) -> list[str]:
    return [e.reason for e in core.list_namespaced_event(ns).items if e.involved_object.name == name]


@pytest.fixture(scope="module")
def two_workers(operator, custom, core, s3, tiny_model_in_s3, dev_cluster):
    """A 2-worker job and the same training on 1 worker, run side by side once per module."""
    with make_namespace(core) as ns:
        core.create_namespaced_secret(ns, dev_cluster.s3_secret("s3"))
        ep = dev_cluster.endpoints.s3
        create(custom, ns, dp_job("one", ns, tiny_model_in_s3, ep, workers=1))
        create(custom, ns, dp_job("two", ns, tiny_model_in_s3, ep, workers=2))
        # the headless Service that gives worker 0 its name for the rendezvous
        svc = wait_for(lambda: _service(core, ns, "two"), 30, "the headless Service")
        assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses
        yield ns, finished(custom, ns, "two"), finished(custom, ns, "one")


def _service(core, ns, name):
    try:
        return core.read_namespaced_service(name, ns)
    except Exception:
        return None


def test_two_workers_train_what_one_worker_with_the_whole_batch_trains(two_workers, s3, core, dev_cluster):
    ns, two, one = two_workers
    assert two["phase"] == "Succeeded" and one["phase"] == "Succeeded", (two, one)
    assert (two["preemptions"], two["failures"], two["attempt"]) == (0, 0, 1)
    rank1 = pod_log(dev_cluster, ns, "two-a1-w1")
    assert "rank 1 of 2 joined (gloo)" in rank1
    # both workers were held at the gang gate and released together
    assert "GangAdmitted" in events(core, ns, "two")
    for w in ("two-a1-w0", "two-a1-w1"):
        assert GANG_GATE not in json.dumps(core.read_namespaced_pod(w, ns).spec.scheduling_gates or [])
    curve_two, curve_one = loss_history(s3, ns, "two"), loss_history(s3, ns, "one")
    assert [s for s, _ in curve_two] == [s for s, _ in curve_one] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for (_, a), (_, b) in zip(curve_two, curve_one, strict=True)) <= 1e-4
    diff = max_abs_diff(adapter(s3, ns, "two"), adapter(s3, ns, "one"))
    assert diff <= 1e-4, f"the 2-worker adapter differs from the 1-worker one by {diff}"


def test_sigterm_to_worker_1_gives_one_checkpoint_and_an_exact_resume(
    two_workers,
    operator,
    custom,
    core,
    namespace,
    s3,
    s3_secret,
    tiny_model_in_s3,
    dev_cluster,
    uncordon,
):
    dp_ns, _, _ = two_workers
    stop_at = random.Random().randint(3, STEPS // 3)
    job = dp_job("stopped", namespace, tiny_model_in_s3, dev_cluster.endpoints.s3, workers=2)
    # the uninterrupted run's checkpoints and output live under its own namespace's prefix:
    # same training, so the same adapter is expected
    create(custom, namespace, job)
    wait_status(
        custom,
        namespace,
        "stopped",
        lambda s: (s.get("progress") or {}).get("step", 0) >= stop_at,
        300,
        f"step {stop_at}",
    )
    evict(core, namespace, "stopped-a1-w1")  # SIGTERM to worker 1 only
    st = finished(custom, namespace, "stopped")
    assert st["phase"] == "Succeeded", st
    assert st["preemptions"] == 1, f"evicted at step {stop_at}+ but the job ended without a preemption: {st}"
    # losing a worker replaced the whole attempt: one preemption, no failure
    assert (st["preemptions"], st["failures"], st["attempt"]) == (1, 0, 2), st
    w0, w1 = (pod_log(dev_cluster, namespace, f"stopped-a1-w{r}") for r in (0, 1))
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", pod_log(dev_cluster, namespace, "stopped-a2-w0"))
    stopped = int(resumed.group(1))
    # rank 0, never signalled, committed the checkpoint of the step both ranks stopped at
    assert_stop_checkpoint(w0, stopped, EVERY)
    for log in (w0, w1):
        exit_line = next(line for line in log.splitlines() if "exit 75:" in line)
        assert json.loads(exit_line.split("exit 75: ", 1)[1])["checkpoint"]["step"] == stopped
    diff = max_abs_diff(adapter(s3, namespace, "stopped"), adapter(s3, dp_ns, "two"))
    assert diff <= 1e-5, f"the resumed adapter differs from the uninterrupted 2-worker run's by {diff}"


GANG_PRODUCT = "Gang-Test-GPU"


def gang_node(name: str) -> dict:
    """A fake (kwok) node with 4 GPUs of a product only the gang test asks for."""
    labels = {
        "kubernetes.io/hostname": name,
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": GANG_PRODUCT,
        "nvidia.com/gpu.memory": "24576",
    }
    capacity = {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "4"}
    return node_manifest(NodeSpec(name=name, labels=labels, capacity=capacity))


@pytest.fixture
def gang_nodes(core, namespace):
    made: list[str] = []

    def add(name: str) -> None:
        core.create_node(gang_node(name))
        made.append(name)

    yield add
    # Empty the nodes before deleting them. Pods left on a deleted node are served by
    # nobody (kwok drops the node) until PodGC's 40 s orphan quarantine ends: the
    # namespace's teardown then took about 55 s of its 60.
    empty_namespace(core, namespace)
    for name in made:
        core.delete_node(name)


def test_a_gang_that_does_not_fit_whole_holds_nothing_until_it_does(
    operator,
    custom,
    core,
    namespace,
    s3_secret,
    tiny_model_in_s3,
    dev_cluster,
    gang_nodes,
):
    gang_nodes("gang-gpu-0")  # room for one 4-GPU worker
    job = e2e_job("gang", namespace, tiny_model_in_s3, dev_cluster.endpoints.s3, workers=2)
    job["spec"]["resources"] = {
        "accelerator": "nvidia",
        "gpusPerWorker": 4,
        "gpuProducts": [GANG_PRODUCT],
        "cpu": "4",
        "memory": "16Gi",
    }
    job["spec"]["podOverrides"] = {}
    job["spec"]["spot"] = {"enabled": False}
    create(custom, namespace, job)
    st = wait_status(
        custom,
        namespace,
        "gang",
        lambda s: s.get("reason") == "WaitingForCapacity" and "room for 1 of 2 workers" in s["message"],
        60,
        "WaitingForCapacity with room for 1 of 2 workers",
    )
    cond = next(c for c in st["conditions"] if c["type"] == "Scheduled")
    assert cond["status"] == "False" and cond["reason"] == "WaitingForCapacity"
    # the operator has looked again (it re-checks every few seconds): still nothing bound
    wait_for(lambda: "WaitingForCapacity" in events(core, namespace, "gang"), 30, "the Warning event")
    pods = core.list_namespaced_pod(namespace, label_selector=f"{GROUP}/job=gang").items
    assert len(pods) == 2
    for p in pods:
        assert p.spec.node_name is None and [g.name for g in p.spec.scheduling_gates] == [GANG_GATE]
    assert status(custom, namespace, "gang")["phase"] == "Pending"

    gang_nodes("gang-gpu-1")  # now both fit: released together and bound
    wait_for(
        lambda: all(
            p.spec.node_name
            for p in core.list_namespaced_pod(namespace, label_selector=f"{GROUP}/job=gang").items
        ),
        60,
        "both workers bound",
    )
    nodes = {
        p.spec.node_name
        for p in core.list_namespaced_pod(namespace, label_selector=f"{GROUP}/job=gang").items
    }
    assert nodes == {"gang-gpu-0", "gang-gpu-1"}
    # Events are posted after the status write, on their own thread: the pods can bind first
    wait_for(lambda: "GangAdmitted" in events(core, namespace, "gang"), 30, "the GangAdmitted event")


def test_a_frozen_worker_is_found_and_its_attempt_replaced_as_a_failure(
    operator, custom, core, namespace, s3_secret, tiny_model_in_s3, dev_cluster, uncordon
):
    """Rank 1 stops dead (its cgroup frozen: a stuck read or a wedged device leaves a
    worker like this); rank 0 waits in the next all-reduce for ever. The operator sees no
    step from either for progressDeadlineSeconds, names the rank that went silent, and
    replaces the attempt as a failure; the next attempt resumes and finishes."""
    job = dp_job("frozen", namespace, tiny_model_in_s3, dev_cluster.endpoints.s3, workers=2)
    job["spec"]["progressDeadlineSeconds"] = 15
    create(custom, namespace, job)
    wait_status(
        custom, namespace, "frozen", lambda s: (s.get("progress") or {}).get("step", 0) >= 3, 300, "step 3"
    )
    dev_cluster.freeze_pod(namespace, "frozen-a1-w1")
    try:
        message = wait_for(
            lambda: next(
                (
                    e.message
                    for e in core.list_namespaced_event(namespace).items
                    if e.involved_object.name == "frozen" and e.reason == "AttemptFailed"
                ),
                None,
            ),
            120,
            "the stalled attempt to be failed",
        )
    finally:
        # thawed, the frozen worker takes its SIGTERM (the attempt's pods are being deleted)
        dev_cluster.thaw_pod(namespace, "frozen-a1-w1")
    assert "worker frozen-a1-w1" in message and "Stalled" in message, message
    assert "rank 1 stopped answering /progress" in message, message
    st = finished(custom, namespace, "frozen")
    assert st["phase"] == "Succeeded", st
    assert (st["failures"], st["preemptions"], st["attempt"]) == (1, 0, 2), st
