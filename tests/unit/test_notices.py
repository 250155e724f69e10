"""Termination notices (kubetune.notices) and what the operator does with them: the
notice of each cloud found on a Node, the next attempt kept off nodes under notice, the
goodput a trainer reports reaching status, and a notice turned into an authenticated
checkpoint request to a real trainer progress server."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from kubetune.decision.reports import goodput_from_trainer
from kubetune.handlers import Controller
from kubetune.kube import Kube
from kubetune.manifests import control_token, with_control_token
from kubetune.notices import NOTICE_TAINTS, notice, pods_on
from kubetune.trainer_client import request_checkpoint
from kubetune_trainer.progress import ProgressServer
from kubetune_trainer.signals import CheckpointRequest, redact
from tests.helpers import wait_for
from tests.unit.helpers import World, job


def node(name="n1", taints=(), conditions=()):
    return {
        "metadata": {"name": name},
        "spec": {"taints": list(taints)},
        "status": {"conditions": list(conditions)},
    }


@pytest.mark.parametrize("key", sorted(NOTICE_TAINTS))
def test_every_clouds_notice_taint_is_a_notice(key):
    found = notice(node(taints=[{"key": key, "effect": "NoSchedule"}]))
    assert found and found.source == key and found.node == "n1" and key in found.reason


def test_azure_scheduled_events_that_take_the_vm_are_notices_and_freeze_or_reboot_are_not():
    def event(message, status="True"):
        return node(
            conditions=[
                {
                    "type": "VMEventScheduled",
                    "status": status,
                    "reason": "VMEventScheduled",
                    "message": message,
                }
            ]
        )

    assert notice(event("Preempt scheduled for 2026-12-02T10:00:00Z")).source == "VMEventScheduled"
    assert notice(event("Terminate scheduled")) and notice(event("Redeploy scheduled"))
    assert notice(event("Freeze scheduled")) is None and notice(event("Reboot scheduled")) is None
    assert notice(event("Preempt scheduled", status="False")) is None


def test_a_plain_spot_node_or_a_cordon_is_not_a_notice():
    spot = node(
        taints=[
            {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
        ]
    )
    assert notice(spot) is None and notice(node()) is None


def test_pods_on_a_node_are_its_live_pods_only():
    def pod(name, node_name, phase, deleting=False):
        meta = {"name": name, **({"deletionTimestamp": "x"} if deleting else {})}
        return {"metadata": meta, "spec": {"nodeName": node_name}, "status": {"phase": phase}}

    pods = [
        pod("a", "n1", "Running"),
        pod("b", "n2", "Running"),
        pod("c", "n1", "Failed"),
        pod("d", "n1", "Running", deleting=True),
        pod("e", "n1", "Pending"),
    ]
    assert [p["metadata"]["name"] for p in pods_on("n1", pods)] == ["a", "e"]


def test_the_next_attempt_avoids_nodes_under_notice_and_carries_the_last_seen_step():
    w = World(job(spot={"enabled": True}))
    w.reconcile()
    w.set_pod("j-a1-w0", "Running", podIP="10.0.0.5")
    w.reconcile(
        progress=(
            "j-a1-w0",
            {"phase": "training", "step": 37, "totalSteps": 100, "updatedAt": "2026-01-01T00:00:10Z"},
        )
    )
    w.set_pod("j-a1-w0", "Failed", exit_code=75)
    from kubetune.decision.decide import decide

    plan = None
    for _ in range(2):
        plan = decide(w.job, list(w.pods.values()), w.now, avoid_nodes=("n1", "n0"))
        w.job["status"] = plan.status
    pod = next(p for p in plan.create if p["metadata"]["name"] == "j-a2-w0")
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert all(
        t["matchFields"]
        == [
            {"key": "metadata.name", "operator": "NotIn", "values": ["n0"]},
            {"key": "metadata.name", "operator": "NotIn", "values": ["n1"]},
        ]
        for t in terms
    )
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_LAST_SEEN_STEP"] == "37"


GOOD = {
    "ratio": 0.93,
    "usefulSeconds": 120.0,
    "lostSeconds": 9.0,
    "recomputedSeconds": 2.0,
    "restartSeconds": 4.0,
    "waitingSeconds": 3.0,
    "otherSeconds": 10.0,
    "wallSeconds": 139.0,
    "stepsRecomputed": 1,
    "attempts": 2,
}


def test_goodput_from_progress_and_termination_messages_reaches_status():
    w = World(job())
    w.reconcile()
    w.set_pod("j-a1-w0", "Running", podIP="10.0.0.5")
    st = w.reconcile(
        progress=(
            "j-a1-w0",
            {
                "phase": "training",
                "step": 3,
                "totalSteps": 10,
                "updatedAt": "2026-01-01T00:00:10Z",
                "goodput": GOOD,
            },
        )
    )
    assert st["goodput"] == GOOD
    done = {**GOOD, "usefulSeconds": 300.0, "ratio": 0.97}
    w.set_pod("j-a1-w0", "Succeeded", exit_code=0)
    w.pods["j-a1-w0"]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = json.dumps(
        {"outcome": "completed", "step": 10, "goodput": done}
    )
    assert w.reconcile()["goodput"] == done


@settings(max_examples=300, deadline=None)
@given(
    hs.dictionaries(
        hs.sampled_from([*GOOD, "x"]),
        hs.one_of(hs.none(), hs.booleans(), hs.integers(), hs.floats(), hs.text(max_size=3)),
    )
)
def test_fuzzed_goodput_reports_give_only_finite_in_range_numbers(report):
    out = goodput_from_trainer(report)
    if out is None:
        return
    json.dumps(out, allow_nan=False)
    assert 0 <= out.get("ratio", 0) <= 1 and all(v >= 0 for v in out.values())
    assert "x" not in out and all(not isinstance(v, bool) for v in out.values())


def test_a_pod_carries_its_control_token_and_the_trainer_never_logs_it():
    pod = {"spec": {"containers": [{"env": [{"name": "A", "value": "b"}]}]}}
    with_control_token(pod, "tok-123456")
    with_control_token(pod, "tok-abcdef")  # replaced, not added twice
    assert control_token(pod) == "tok-abcdef" and len(pod["spec"]["containers"][0]["env"]) == 2
    assert redact("token tok-abcdef", {"KUBETUNE_CONTROL_TOKEN": "tok-abcdef"}) == "token ***"


def running_job(podip: str, token: str, node_name: str):
    j = job(spot={"enabled": True})
    j["metadata"]["resourceVersion"] = "1"
    j["status"] = {"phase": "Running", "attempt": 1}
    pod = {
        "metadata": {
            "name": "j-a1-w0",
            "namespace": "ns",
            "labels": {"kubetune.io/job": "j", "kubetune.io/attempt": "1", "kubetune.io/rank": "0"},
            "ownerReferences": [
                {
                    "controller": True,
                    "uid": "u1",
                    "kind": "FineTuneJob",
                    "name": "j",
                    "apiVersion": "kubetune.io/v1alpha1",
                }
            ],
        },
        "spec": {"nodeName": node_name, "containers": [{"env": []}]},
        "status": {"phase": "Running", "podIP": podip},
    }
    return j, with_control_token(pod, token)


def test_a_notice_asks_the_trainer_on_that_node_for_a_checkpoint_once_and_a_withdrawal_cancels_nothing():
    asked = CheckpointRequest()
    server = ProgressServer(0, "127.0.0.1", control_token="s3cret-token", checkpoint_request=asked)
    controller = Controller(
        kube=Kube(api=None), workers=1
    )  # (no API server: its writes fail, as best effort)
    controller.trainer_port = server.port
    try:
        j, pod = running_job("127.0.0.1", "s3cret-token", "spot-1")
        controller.cache.put_job(("ns", "j"), j)
        controller.cache.put_pod(("ns", "j"), pod)
        other = node(
            "spot-2", taints=[{"key": "cloud.google.com/impending-node-termination", "effect": "NoSchedule"}]
        )
        controller.node_event("MODIFIED", other)  # a node without kubetune pods: nothing
        controller.requests.submit(lambda: None).result()
        assert not asked.pending and "spot-2" in controller.notices
        noticed = node(
            "spot-1", taints=[{"key": "aws-node-termination-handler/spot-itn", "effect": "NoSchedule"}]
        )
        controller.node_event("MODIFIED", noticed)
        wait_for(lambda: asked.pending, 10, "the checkpoint request")
        assert "AWS Spot interruption notice" in asked.reason and "spot-1" in asked.reason
        # the same notice seen again (every node update, a relist) asks nothing more
        asked.take()
        controller.node_event("MODIFIED", copy.deepcopy(noticed))
        controller.requests.submit(lambda: None).result()
        assert not asked.pending
        # withdrawn: forgotten, nothing else happens; the next attempt may use the node again
        controller.node_event("MODIFIED", node("spot-1"))
        assert "spot-1" not in controller.notices and not asked.pending
    finally:
        server.close()
        controller.requests.shutdown()


def test_a_checkpoint_request_without_the_right_token_is_refused():
    asked = CheckpointRequest()
    server = ProgressServer(0, "127.0.0.1", control_token="right-token", checkpoint_request=asked)
    try:
        assert request_checkpoint("127.0.0.1", "wrong-token", "x", port=server.port) is None
        assert request_checkpoint("127.0.0.1", None, "x", port=server.port) is None
        assert not asked.pending
        answer = request_checkpoint("127.0.0.1", "right-token", "x", port=server.port)
        assert answer == {"accepted": True, "coalesced": False, "step": 0} and asked.pending
        assert request_checkpoint("127.0.0.1", "right-token", "y", port=server.port)["coalesced"] is True
    finally:
        server.close()


def test_only_notices_the_scheduler_cannot_see_keep_new_attempts_off_a_node():
    controller = Controller(
        kube=Kube(api=None), workers=1
    )  # (no API server: its writes fail, as best effort)
    try:
        controller.node_event(
            "ADDED", node("gke-1", taints=[{"key": "cloud.google.com/impending-node-termination"}])
        )
        azure = [{"type": "VMEventScheduled", "status": "True", "message": "Preempt scheduled"}]
        controller.node_event("ADDED", node("aks-1", conditions=azure))
        # the taint keeps pods off by itself, and goes with the notice; the condition does not
        assert controller.avoided_nodes() == ("aks-1",)
        controller.node_event("MODIFIED", node("aks-1"))
        assert controller.avoided_nodes() == ()
    finally:
        controller.requests.shutdown()


def test_a_notice_seen_before_the_jobs_pods_is_acted_on_when_they_show_up():
    asked = CheckpointRequest()
    server = ProgressServer(0, "127.0.0.1", control_token="tok-later", checkpoint_request=asked)
    controller = Controller(
        kube=Kube(api=None), workers=1
    )  # (no API server: its writes fail, as best effort)
    controller.trainer_port = server.port
    try:
        # an operator restart lists the nodes before the pods
        controller.node_event("ADDED", node("spot-9", taints=[{"key": "karpenter.sh/disrupted"}]))
        j, pod = running_job("127.0.0.1", "tok-later", "spot-9")
        controller.cache.put_job(("ns", "j"), j)
        controller.cache.put_pod(("ns", "j"), pod)
        controller._ask_if_noticed(("ns", "j"))  # (what each pod event does)
        wait_for(lambda: asked.pending, 10, "the checkpoint request")
        asked.take()
        controller._ask_if_noticed(("ns", "j"))  # once per attempt and node
        controller.requests.submit(lambda: None).result()
        assert not asked.pending
    finally:
        server.close()
        controller.requests.shutdown()
