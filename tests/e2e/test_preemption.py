"""Spot preemption end to end: the real operator, real trainer processes on the pod
runner's nodes, data, model and checkpoints in the dev cluster's MinIO. A worker is taken
away mid-training; the job resumes from its checkpoint and ends with the adapter an
uninterrupted run produces."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune_dev.devcluster.nodes import GKE_SPOT_LABEL
from tests.e2e.helpers import (
    EVERY,
    STEPS,
    adapter,
    assert_stop_checkpoint,
    e2e_job,
    evict,
    pod_log,
    resumed_step,
    trained_steps,
    wait_status,
)
from tests.helpers import kubectl
from tests.trainer.conftest import max_abs_diff

pytestmark = pytest.mark.cluster


def test_graceful_eviction_resumes_exactly_and_nothing_leaks(
    operator, custom, core, namespace, s3, s3_secret, tiny_model_in_s3, dev_cluster, uncordon
):
    ep = dev_cluster.endpoints.s3
    # the same job twice: one left alone, one evicted mid-training
    for name in ("calm", "evicted"):
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, e2e_job(name, namespace, tiny_model_in_s3, ep)
        )
    st = wait_status(
        custom, namespace, "evicted", lambda s: (s.get("progress") or {}).get("step", 0) >= 12, 240, "step 12"
    )
    # kubectl get ftj while it runs: phase, step/total, loss, preemptions
    out = kubectl(dev_cluster, namespace, "get", "ftj", "evicted").stdout.splitlines()
    cols = out[1].split()
    assert (
        cols[1] == "Running" and cols[2].split("/")[1] == str(STEPS) and float(cols[4]) > 0 and cols[5] == "0"
    ), out
    node = evict(core, namespace, "evicted-a1-w0")

    st = wait_status(
        custom,
        namespace,
        "evicted",
        lambda s: s.get("phase") in ("Succeeded", "Failed"),
        300,
        "evicted to finish",
    )
    assert st["phase"] == "Succeeded", st
    assert (st["preemptions"], st["failures"], st["attempt"]) == (1, 0, 2)
    first = (
        json.loads(
            core.read_namespaced_pod("evicted-a1-w0", namespace)
            .status.container_statuses[0]
            .state.terminated.message
        )
        if _exists(core, namespace, "evicted-a1-w0")
        else None
    )
    second_log = pod_log(dev_cluster, namespace, "evicted-a2-w0")
    stopped = resumed_step(second_log)
    first_log = pod_log(dev_cluster, namespace, "evicted-a1-w0")
    # lost steps = 0: attempt 2 starts at the step attempt 1's SIGTERM checkpoint recorded
    assert_stop_checkpoint(first_log, stopped, EVERY)
    assert (
        f'"step": {stopped},' in [line for line in first_log.splitlines() if '"event": "train"' in line][-1]
    )
    if first:
        assert first["outcome"] == "preempted" and first["step"] == stopped
    assert core.read_namespaced_pod("evicted-a2-w0", namespace).spec.node_name != node

    calm = wait_status(
        custom, namespace, "calm", lambda s: s.get("phase") in ("Succeeded", "Failed"), 300, "calm to finish"
    )
    assert calm["phase"] == "Succeeded" and calm["preemptions"] == 0
    diff = max_abs_diff(adapter(s3, namespace, "evicted"), adapter(s3, namespace, "calm"))
    assert diff <= 1e-5, f"the evicted job's adapter differs from the uninterrupted one's by {diff}"
    assert st["adapter"]["sha256"] and st["adapter"]["uri"].endswith(f"{namespace}/evicted/out/")

    # the S3 secret appears nowhere
    secret = dev_cluster.endpoints.s3_secret_key
    job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "evicted")
    events = [e.message for e in core.list_namespaced_event(namespace).items]
    terminations = [
        cs.state.terminated.message or ""
        for p in core.list_namespaced_pod(namespace).items
        for cs in (p.status.container_statuses or [])
        if cs.state.terminated
    ]
    operator_log = (dev_cluster.workdir / "logs" / "operator.log").read_text()
    trainer_logs = [
        pod_log(dev_cluster, namespace, p) for p in ("calm-a1-w0", "evicted-a1-w0", "evicted-a2-w0")
    ]
    for where, text in [
        ("FineTuneJob", json.dumps(job)),
        ("events", "\n".join(events)),
        ("termination messages", "\n".join(terminations)),
        ("operator log", operator_log),
        ("trainer logs", "\n".join(trainer_logs)),
    ]:
        assert secret not in text, f"the S3 secret leaked into the {where}"


def _exists(core, ns, pod) -> bool:
    try:
        core.read_namespaced_pod(pod, ns)
        return True
    except client.ApiException:
        return False


def test_hard_loss_resumes_from_the_last_periodic_checkpoint(
    operator, custom, core, namespace, s3, s3_secret, tiny_model_in_s3, dev_cluster
):
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        e2e_job("hard", namespace, tiny_model_in_s3, dev_cluster.endpoints.s3),
    )
    wait_status(
        custom,
        namespace,
        "hard",
        # the periodic upload is asynchronous: wait for its commit, not for the step that started it
        lambda s: (
            (ckpt := (s.get("lastCheckpoint") or {}).get("step", 0)) >= EVERY
            and (s.get("progress") or {}).get("step", 0) >= ckpt + 3
        ),
        240,
        "a committed checkpoint and 3 steps after it",
    )
    # no grace: the trainer's processes stop at once and the pod is gone, as with a vanished VM
    dev_cluster.lose_pod(namespace, "hard-a1-w0")
    st = wait_status(
        custom, namespace, "hard", lambda s: s.get("phase") in ("Succeeded", "Failed"), 300, "hard to finish"
    )
    assert st["phase"] == "Succeeded" and (st["preemptions"], st["failures"]) == (1, 0)
    lost_log = pod_log(dev_cluster, namespace, "hard-a1-w0")
    killed_at = trained_steps(lost_log)[-1]
    # the newest checkpoint its log saw committed; one committed in the instant of the kill may be newer still
    committed = max(
        int(x.split("checkpoint step ")[1].split()[0]) for x in lost_log.splitlines() if " committed to " in x
    )
    resumed = resumed_step(pod_log(dev_cluster, namespace, "hard-a2-w0"))
    assert resumed % EVERY == 0 and committed <= resumed <= killed_at, (committed, resumed, killed_at)


def test_after_on_demand_after_preemptions_the_next_attempt_runs_on_demand(
    operator, custom, core, namespace, s3, s3_secret, tiny_model_in_s3, dev_cluster, uncordon
):
    job = e2e_job(
        "hopper",
        namespace,
        tiny_model_in_s3,
        dev_cluster.endpoints.s3,
        spot={"enabled": True, "onDemandAfterPreemptions": 3},
    )
    job["spec"]["training"]["maxSteps"] = 400  # outlives five evictions
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    nodes = {}
    for attempt in range(1, 6):
        wait_status(
            custom,
            namespace,
            "hopper",
            lambda s, a=attempt: s.get("attempt") == a and s.get("phase") == "Running",
            180,
            f"attempt {attempt} running",
        )
        pod = f"hopper-a{attempt}-w0"
        node = core.read_namespaced_pod(pod, namespace).spec.node_name
        nodes[attempt] = core.read_node(node).metadata.labels.get(GKE_SPOT_LABEL) == "true"
        core.delete_namespaced_pod(pod, namespace)  # a graceful loss, like a reclaim notice
    st = wait_status(
        custom,
        namespace,
        "hopper",
        lambda s: s.get("attempt") == 6 and s.get("phase") == "Running",
        180,
        "attempt 6",
    )
    assert st["preemptions"] == 5 and st["failures"] == 0
    assert nodes[1] and nodes[2] and nodes[3], "the first attempts prefer spot nodes"
    assert not nodes[4] and not nodes[5], "after 3 preemptions the attempts run on on-demand capacity"
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "hopper")
