"""The reconcile decision, table by table: attempts, preemptions vs failures, limits,
suspend, deadlines and TTL. A tiny fake API server applies the status merge patches
exactly like the real one (nulls delete), so repeated reconciles must be idempotent."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from kubetune.api import FineTuneJobSpec
from kubetune.decision.conditions import iso, merge_patch
from kubetune.decision.decide import Need, decide
from kubetune.decision.pods import GONE, LossKind, classify_loss
from kubetune.decision.refusals import after_refusal, create_backoff
from kubetune.decision.reports import format_eta, progress_from_trainer
from kubetune.gang import GANG_GATE, Fit
from kubetune.manifests import build_attempt
from tests.unit.helpers import T0, World, job


def test_first_reconcile_creates_attempt_one_and_repeats_are_idempotent():
    w = World(job(workers=2))
    st = w.reconcile()
    assert [p["metadata"]["name"] for p in w.plans[0].create] == ["j-a1-w0", "j-a1-w1"]
    assert (st["phase"], st["attempt"], st["preemptions"], st["failures"]) == ("Pending", 1, 0, 0)
    w.reconcile(3)
    assert all(not p.create for p in w.plans[1:])
    for name in ("j-a1-w0", "j-a1-w1"):
        w.set_pod(name, "Running")
    assert w.reconcile()["phase"] == "Running"
    # a first attempt's way to Running is in its status, not in Events (a write each)
    assert [e[1] for p in w.plans for e in p.events] == ["GangAdmitted"]


def test_workers_wait_at_the_gang_gate_until_all_fit_then_are_released_together():
    w = World(job(workers=2))
    w.gang = Fit(False, "room for 1 of 2 workers")
    w.reconcile()
    assert all(p["spec"]["schedulingGates"] == [{"name": GANG_GATE}] for p in w.pods.values())
    st = w.reconcile(2)
    assert not any(p.ungate for p in w.plans)
    assert (st["phase"], st["reason"]) == ("Pending", "WaitingForCapacity")
    assert "room for 1 of 2 workers" in st["message"]
    assert next(c for c in st["conditions"] if c["type"] == "Scheduled")["reason"] == "WaitingForCapacity"
    assert w.plans[-1].requeue_after == 5.0  # capacity frees up without an event on the job
    assert [e[1] for p in w.plans for e in p.events].count("WaitingForCapacity") == 1
    w.gang = Fit(True, "room for all 2 workers")
    w.reconcile()
    assert sorted(w.plans[-1].ungate) == ["j-a1-w0", "j-a1-w1"]
    assert not any(p["spec"].get("schedulingGates") for p in w.pods.values())


def test_single_workers_and_kueue_gangs_get_no_gate_of_ours():
    w = World(job())
    w.reconcile()
    assert "schedulingGates" not in w.pods["j-a1-w0"]["spec"]
    w = World(job(workers=3, queueName="team-a"))
    w.reconcile()
    pod = w.pods["j-a1-w2"]
    assert "schedulingGates" not in pod["spec"]  # Kueue's webhook adds its own
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "j-a1"
    assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "3"
    # a lost worker ends the attempt: Kueue must not hold the quota for replacement pods
    assert pod["metadata"]["annotations"]["kueue.x-k8s.io/retriable-in-group"] == "false"


def test_a_pod_group_kueue_holds_shows_queued_then_runs_with_a_boost_from_its_checkpoint_age():
    w = World(job(queueName="team-a"))
    w.reconcile()
    w.pods["j-a1-w0"]["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    st = w.reconcile()
    assert (st["phase"], st["reason"]) == ("Pending", "Queued") and "team-a" in st["message"]
    assert w.plans[-1].workload_boost is None  # nothing runs yet
    w.pods["j-a1-w0"]["spec"].pop("schedulingGates")  # Kueue admitted the group
    w.set_pod("j-a1-w0", "Running", podIP="10.0.0.5")
    st = w.reconcile()
    assert st["phase"] == "Running"
    assert w.plans[-1].workload_boost == ("j-a1", 0)  # no checkpoint: a preemption loses it all
    ref = {"step": 20, "uri": "s3://b/c/step-00000020/", "time": iso(T0 - dt.timedelta(seconds=5))}
    body = {"step": 21, "totalSteps": 100, "updatedAt": iso(T0), "lastCheckpoint": ref}
    w.reconcile(progress=("j-a1-w0", body))
    assert w.plans[-1].workload_boost == ("j-a1", -100)  # just saved: the cheapest to preempt
    w.now = T0 + dt.timedelta(hours=1)
    w.reconcile(progress=("j-a1-w0", body))
    assert w.plans[-1].workload_boost == ("j-a1", 0)  # an hour of work since: as dear as any


def env_of(pod: dict) -> dict:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_a_notice_starts_the_next_attempt_as_a_standby_elsewhere_and_its_turn_sends_it_start():
    w = running_world()  # j-a1-w0 runs on n1
    w.noticed = ("n1",)
    w.reconcile()
    (standby,) = w.plans[-1].create
    assert standby["metadata"]["name"] == "j-a2-w0" and env_of(standby)["KUBETUNE_STANDBY"] == "1"
    terms = standby["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "metadata.name", "operator": "NotIn", "values": ["n1"]} in [
        f for t in terms["nodeSelectorTerms"] for f in t.get("matchFields", [])
    ]
    assert w.plans[-1].events[-1][:2] == ("Normal", "StandbyCreated")
    st = w.reconcile()
    assert not w.plans[-1].create and st["attempt"] == 1  # one standby; the attempt is still 1
    w.set_pod("j-a2-w0", "Running", node="n2", podIP="10.0.0.6")
    w.reconcile(progress=("j-a2-w0", {"phase": "standby", "updatedAt": iso(T0)}))
    assert w.plans[-1].start == []  # not its turn while attempt 1 trains
    # the reclaim: attempt 1 saved its step on the SIGTERM and stopped
    w.set_pod("j-a1-w0", "Failed", exit_code=75)
    st = w.reconcile(2)
    assert (st["attempt"], st["preemptions"], st["failures"]) == (2, 1, 0)
    # its standby runs already: told to start at once (not after the next progress poll)
    assert w.plans[-1].start == ["j-a2-w0"] and w.plans[-1].requeue_after == 0.5
    st = w.reconcile(progress=("j-a2-w0", {"phase": "standby", "updatedAt": iso(T0)}))
    assert w.plans[-1].start == ["j-a2-w0"]
    assert w.plans[-1].delete == []  # the standby is the attempt now
    body = {
        "phase": "training",
        "step": 41,
        "totalSteps": 100,
        "updatedAt": iso(T0 + dt.timedelta(seconds=1)),
    }
    st = w.reconcile(progress=("j-a2-w0", body))
    assert w.plans[-1].start == [] and st["phase"] == "Running" and st["progress"]["step"] == 41


def test_a_withdrawn_notice_deletes_the_standby_and_multi_worker_or_opted_out_jobs_get_none():
    w = running_world()
    w.noticed = ("n1",)
    w.reconcile()
    w.noticed = ()
    w.reconcile()
    assert w.plans[-1].delete == ["j-a2-w0"] and w.plans[-1].events[-1][1] == "StandbyWithdrawn"
    # noticed again at once: the deleted standby may linger (the cache keeps a deleted pod's
    # last state); a new one is made all the same (its create waits for the name)
    w.pods["j-a2-w0"]["status"] = {"phase": "Pending", "containerStatuses": [{"state": {"terminated": {}}}]}
    w.pods["j-a2-w0"][GONE] = True
    w.noticed = ("n1",)
    w.reconcile()
    assert [p["metadata"]["name"] for p in w.plans[-1].create] == ["j-a2-w0"]
    for spec in ({"workers": 2}, {"spot": {"enabled": True, "standby": False}}):
        w = World(job(**spec))
        w.reconcile()
        for name in list(w.pods):
            w.set_pod(name, "Running", podIP="10.0.0.5")
        w.reconcile()
        w.noticed = ("n1",)
        w.reconcile()
        assert not w.plans[-1].create, spec


def test_a_standby_that_ends_before_its_turn_is_replaced_and_never_counted():
    w = running_world()
    w.noticed = ("n1",)
    w.reconcile()
    w.set_pod("j-a2-w0", "Failed", exit_code=75, node="n2")  # its own node was reclaimed
    w.reconcile()
    assert w.plans[-1].delete == ["j-a2-w0"] and not w.plans[-1].create
    del w.pods["j-a2-w0"]
    w.reconcile()
    assert [p["metadata"]["name"] for p in w.plans[-1].create] == ["j-a2-w0"]  # a new standby
    # the running attempt is lost while its standby has just ended too: one preemption
    w.set_pod("j-a2-w0", "Failed", exit_code=75, node="n2")
    w.set_pod("j-a1-w0", "Failed", exit_code=75)
    st = w.reconcile(2)
    assert (st["attempt"], st["preemptions"], st["failures"]) == (2, 1, 0)
    assert "j-a2-w0" in w.plans[-1].delete and not w.plans[-1].create
    del w.pods["j-a2-w0"]
    w.noticed = ()
    st = w.reconcile()
    assert [p["metadata"]["name"] for p in w.plans[-1].create] == ["j-a2-w0"]
    assert "KUBETUNE_STANDBY" not in env_of(w.plans[-1].create[0])  # an ordinary attempt now
    assert (st["preemptions"], st["failures"]) == (1, 0)


def test_kueues_preemption_of_a_pod_group_is_a_preemption():
    w = running_world()
    w.set_pod(
        "j-a1-w0",
        "Failed",
        exit_code=1,
        conditions=[
            {"type": "TerminationTarget", "status": "True", "reason": "Preempted", "message": "by x"}
        ],
    )
    st = w.reconcile()
    assert (st["preemptions"], st["failures"]) == (1, 0)


def test_a_preemption_is_counted_once_and_the_next_attempt_waits_for_the_old_pods():
    w = World(job(spot={"enabled": True}))
    w.reconcile()
    w.set_pod("j-a1-w0", "Running")
    w.reconcile()
    w.set_pod("j-a1-w0", "Failed", exit_code=75)  # checkpointed on SIGTERM
    st = w.reconcile()
    assert (st["phase"], st["attempt"], st["preemptions"], st["failures"]) == ("Preempted", 2, 1, 0)
    st = w.reconcile(3)
    assert st["preemptions"] == 1 and "j-a2-w0" in w.pods
    w.set_pod("j-a2-w0", "Running")
    assert w.reconcile()["phase"] == "Running"
    # what the status overwrote has its Event: the preemption, and the next attempt's start
    events = [(e[0], e[1]) for p in w.plans for e in p.events]
    assert events == [("Warning", "Preempted"), ("Normal", "Running")], events


def test_attempt_waits_while_a_preempted_pod_is_still_terminating():
    w = World(job(workers=2))
    w.reconcile()
    w.set_pod("j-a1-w0", "Running")
    w.set_pod("j-a1-w1", "Running")
    w.reconcile()
    w.remove("j-a1-w1")  # node gone: worker 1 lost; worker 0 must stop first
    st = w.reconcile()
    assert st["preemptions"] == 1 and w.pods["j-a1-w0"]["metadata"].get("deletionTimestamp")
    w.reconcile(2)
    assert "j-a2-w0" not in w.pods, "no new attempt while a worker of the old one still runs"
    w.set_pod("j-a1-w0", "Failed", exit_code=75)
    w.reconcile()
    assert {"j-a2-w0", "j-a2-w1"} <= set(w.pods)


def test_a_worker_missing_from_the_cache_is_judged_only_on_a_fresh_pod_list():
    """decide() never charges a loss on a watch cache's word: it asks for the pods as the
    API server lists them (Need.POD_LIST), and nothing of that plan is to be applied."""
    w = World(job(workers=2))
    w.reconcile()
    w.set_pod("j-a1-w0", "Running")
    w.set_pod("j-a1-w1", "Running")
    w.reconcile()
    cached = [p for n, p in w.pods.items() if n != "j-a1-w1"]  # the cache missed w1
    plan = decide(w.job, cached, w.now, pods_from_cache=True)
    assert plan.need is Need.POD_LIST and not plan.delete and not plan.losses and not plan.events
    listed = decide(w.job, list(w.pods.values()), w.now)  # the list has it: nothing lost
    assert listed.need is None and not listed.losses and listed.status["phase"] == "Running"
    gone = decide(w.job, cached, w.now)  # listed, and really gone: a preemption
    assert [(loss.kind, loss.reason) for loss in gone.losses] == [(LossKind.PREEMPTION, "PodDeleted")]


def test_gated_workers_ask_for_the_nodes_capacity_before_anything_is_released():
    w = World(job(workers=3))
    w.reconcile()
    plan = decide(w.job, list(w.pods.values()), w.now)
    assert plan.need is Need.CAPACITY and plan.waiting == ["j-a1-w0", "j-a1-w1", "j-a1-w2"]
    assert not plan.ungate
    plan = decide(w.job, list(w.pods.values()), w.now, gang=Fit(True, "room for all 3 workers"))
    assert plan.need is None and plan.ungate == ["j-a1-w0", "j-a1-w1", "j-a1-w2"]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_an_attempt_has_a_service_exactly_when_it_has_several_workers(workers):
    spec = FineTuneJobSpec.model_validate(job(workers=workers)["spec"])
    made = build_attempt("j", "u1", spec, attempt=1, preemptions=0)
    assert [p["metadata"]["name"] for p in made.pods] == [f"j-a1-w{r}" for r in range(workers)]
    assert (made.service is not None) == (workers > 1)
    assert [o["kind"] for o in made.objects()] == ["Service"] * (workers > 1) + ["Pod"] * workers
    w = World(job(workers=workers))  # the reconcile's attempt is the same
    w.reconcile()
    assert w.plans[0].service == made.service
    assert [p["metadata"]["name"] for p in w.plans[0].create] == [p["metadata"]["name"] for p in made.pods]


def test_failures_use_backoff_limit_and_preemptions_do_not():
    w = World(job(backoffLimit=1, spot={"enabled": True, "maxPreemptions": 5}))
    w.reconcile()
    w.set_pod("j-a1-w0", "Failed", exit_code=137, deletionTimestamp=None)
    w.pods["j-a1-w0"]["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    ]
    w.reconcile(2)
    w.set_pod("j-a2-w0", "Failed", exit_code=1)
    st = w.reconcile(2)
    assert (st["attempt"], st["preemptions"], st["failures"]) == (3, 1, 1)
    w.set_pod("j-a3-w0", "Failed", exit_code=1)
    st = w.reconcile()
    assert (st["phase"], st["reason"], st["failures"]) == ("Failed", "BackoffLimitExceeded", 2)


def test_config_errors_fail_at_once():
    w = World(job(backoffLimit=5))
    w.reconcile()
    w.set_pod("j-a1-w0", "Failed", exit_code=66)
    st = w.reconcile()
    assert (st["phase"], st["reason"], st["failures"]) == ("Failed", "ConfigError", 0)


@pytest.mark.parametrize(
    ("message", "permanent"),
    [
        ('secret "s3" not found', True),
        ("couldn't find key AWS_ACCESS_KEY_ID in Secret ns/s3", True),
        ("failed to sync secret cache: timed out waiting for the condition", False),  # the kubelet retries
    ],
)
def test_only_a_missing_secret_or_key_is_a_permanent_config_error(message, permanent):
    from kubetune.decision.pods import config_error

    pod = {
        "metadata": {"name": "j-a1-w0"},
        "status": {
            "containerStatuses": [
                {"state": {"waiting": {"reason": "CreateContainerConfigError", "message": message}}}
            ]
        },
    }
    assert (config_error([pod]) is not None) == permanent


def test_a_missing_secret_is_waited_for_a_while_then_fails_the_job():
    w = World(job())
    w.reconcile()
    waiting = {
        "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}}
    }
    w.set_pod("j-a1-w0", "Pending", containerStatuses=[waiting])
    st = w.reconcile()
    assert (st["phase"], st["reason"]) == ("Pending", "WaitingForConfig") and 'secret "s3"' in st["message"]
    assert w.plans[-1].requeue_after == 60 and w.plans[-1].events[0][:2] == ("Warning", "WaitingForConfig")
    w.now += dt.timedelta(seconds=10)
    st = w.reconcile()
    assert st["phase"] == "Pending" and w.plans[-1].requeue_after == 50 and not w.plans[-1].events
    # the Secret appeared: the pod runs, the job with it
    w.set_pod("j-a1-w0", "Running")
    assert w.reconcile()["phase"] == "Running"
    # ... or it did not, within the grace
    w2 = World(job())
    w2.reconcile()
    w2.set_pod("j-a1-w0", "Pending", containerStatuses=[waiting])
    w2.now += dt.timedelta(seconds=61)
    st = w2.reconcile()
    assert (st["phase"], st["reason"]) == ("Failed", "InvalidSpec")


def test_too_many_preemptions():
    w = World(job(spot={"enabled": True, "maxPreemptions": 1}))
    w.reconcile()
    for attempt in (1, 2):
        w.remove(f"j-a{attempt}-w0")
        w.reconcile(2)
    st = w.job["status"]
    assert (st["phase"], st["reason"], st["preemptions"]) == ("Failed", "TooManyPreemptions", 2)


def test_on_demand_after_preemptions_changes_placement():
    w = World(job(spot={"enabled": True, "onDemandAfterPreemptions": 1}))
    w.reconcile()
    first = w.pods["j-a1-w0"]["spec"]
    assert any(t["key"] == "cloud.google.com/gke-spot" for t in first["tolerations"])
    w.remove("j-a1-w0")
    w.reconcile(2)
    terms = w.pods["j-a2-w0"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    exprs = terms["nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "cloud.google.com/gke-spot", "operator": "NotIn", "values": ["true"]} in exprs


def test_success_records_adapter_and_checkpoint_from_the_termination_message():
    w = World(job())
    w.reconcile()
    w.set_pod("j-a1-w0", "Succeeded", exit_code=0)
    w.pods["j-a1-w0"]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = (
        '{"outcome": "succeeded", "step": 300, "adapter": {"uri": "s3://out-x/o/", "sha256": "ab", "sizeBytes": 5},'
        ' "checkpoint": {"step": 300, "uri": "s3://ck-x/c/step-00000300/"}, "secret": "ignored"}'
    )
    st = w.reconcile()
    assert st["phase"] == "Succeeded" and st["completionTime"]
    assert st["adapter"] == {"uri": "s3://out-x/o/", "sha256": "ab", "sizeBytes": 5}
    assert st["lastCheckpoint"]["step"] == 300 and st["progress"]["summary"] == "300/300 (100%)"


def test_success_records_the_evaluation_and_drops_what_is_not_a_finite_number():
    w = World(job())
    w.reconcile()
    w.set_pod("j-a1-w0", "Succeeded", exit_code=0)
    w.pods["j-a1-w0"]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = (
        '{"outcome": "completed", "step": 300, "adapter": {"uri": "s3://o/a/"}, "evaluation": '
        '{"split": "s3://d/eval/", "examples": 40, "exactMatchBefore": 0, "exactMatch": 0.925, '
        '"exactMatchUnquantizedBase": 0.87512, "evalLoss": NaN, "script": "x"}}'
    )
    st = w.reconcile()
    assert st["evaluation"] == {
        "split": "s3://d/eval/",
        "examples": 40,
        "exactMatchBefore": 0.0,
        "exactMatch": 0.925,
        "exactMatchUnquantizedBase": 0.8751,
    }


def test_suspend_then_resume_starts_a_fresh_attempt():
    w = World(job())
    w.reconcile()
    w.set_pod("j-a1-w0", "Running")
    w.reconcile()
    w.job["spec"]["suspend"] = True
    w.reconcile()
    assert w.pods["j-a1-w0"]["metadata"]["deletionTimestamp"]
    w.remove("j-a1-w0")
    assert w.reconcile()["phase"] == "Suspended"
    w.job["spec"]["suspend"] = False
    st = w.reconcile(3)
    assert (st["attempt"], st["preemptions"], st["failures"]) == (2, 0, 0) and "j-a2-w0" in w.pods


def test_deadline_and_ttl():
    w = World(job(activeDeadlineSeconds=60, ttlSecondsAfterFinished=30))
    w.reconcile()
    w.now = T0 + dt.timedelta(seconds=59)
    assert w.reconcile()["phase"] == "Pending" and w.plans[-1].requeue_after == pytest.approx(1)
    w.now = T0 + dt.timedelta(seconds=61)
    st = w.reconcile()
    assert (st["phase"], st["reason"]) == ("Failed", "DeadlineExceeded")
    assert w.pods["j-a1-w0"]["metadata"]["deletionTimestamp"]
    w.now += dt.timedelta(seconds=29)
    plan = decide(w.job, list(w.pods.values()), w.now)
    assert not plan.delete_job and plan.requeue_after == pytest.approx(1)
    plan = decide(w.job, list(w.pods.values()), w.now + dt.timedelta(seconds=2))
    assert plan.delete_job


def test_invalid_spec_fails_and_a_fixed_spec_is_looked_at_again():
    j = job()
    j["spec"]["lora"] = {"r": 0}
    w = World(j)
    st = w.reconcile()
    assert (st["phase"], st["reason"]) == ("Failed", "InvalidSpec") and "spec.lora.r" in st["message"]
    w.job["spec"]["lora"] = {"r": 8}
    w.job["metadata"]["generation"] = 2
    st = w.reconcile()
    assert st["phase"] == "Pending" and "j-a1-w0" in w.pods


@pytest.mark.parametrize(
    ("pod", "kind", "reason"),
    [
        (None, "preemption", "PodDeleted"),
        (
            {
                "status": {
                    "phase": "Failed",
                    "conditions": [
                        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
                    ],
                }
            },
            "preemption",
            "DeletionByTaintManager",
        ),
        ({"status": {"phase": "Failed", "reason": "Shutdown"}}, "preemption", "Shutdown"),
        (
            {
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [{"state": {"terminated": {"exitCode": 75}}}],
                }
            },
            "preemption",
            "StoppedForPreemption",
        ),
        (
            {
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [
                        {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
                    ],
                }
            },
            "failure",
            "OOMKilled",
        ),
        (
            {
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [{"state": {"terminated": {"exitCode": 64}}}],
                }
            },
            "permanent",
            "ConfigError",
        ),
        (
            {
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [{"state": {"terminated": {"exitCode": 1}}}],
                }
            },
            "failure",
            "Error",
        ),
    ],
)
def test_classify_loss(pod, kind, reason):
    if pod is not None:
        pod = {"metadata": {"name": "p"}, "spec": {"nodeName": "n"}, **pod}
    loss = classify_loss(pod, "p")
    assert (loss.kind, loss.reason) == (kind, reason)


def test_merge_patch_removes_with_null_and_keeps_unchanged_out():
    assert merge_patch({"a": 1, "b": {"c": 1, "d": 2}, "e": 5}, {"a": 2, "b": {"c": 1}, "e": 5}) == {
        "a": 2,
        "b": {"d": None},
    }
    assert merge_patch({"x": 1}, {"x": 1}) == {}


def test_polled_progress_reaches_status_only_from_the_current_rank0():
    w = World(job())
    w.reconcile()
    w.set_pod("j-a1-w0", "Running", podIP="10.0.0.5")
    w.reconcile()
    body = {
        "step": 30,
        "totalSteps": 120,
        "loss": 0.41234567,
        "etaSeconds": 3725,
        "updatedAt": "2026-01-01T00:00:10Z",
    }
    st = w.reconcile(progress=("j-a1-w0", body))
    assert st["progress"] == {
        "step": 30,
        "totalSteps": 120,
        "summary": "30/120 (25%)",
        "loss": 0.4123,
        "eta": "1h2m",
        "updatedAt": "2026-01-01T00:00:10Z",
    }
    # an older answer, or one from another pod (a previous attempt), changes nothing
    assert (
        w.reconcile(progress=("j-a1-w0", {**body, "step": 10, "updatedAt": "2026-01-01T00:00:05Z"}))[
            "progress"
        ]["step"]
        == 30
    )
    assert (
        w.reconcile(progress=("j-a0-w0", {**body, "step": 99, "updatedAt": "2026-01-01T00:01:00Z"}))[
            "progress"
        ]["step"]
        == 30
    )


def test_a_committed_checkpoint_reaches_status_while_the_trainer_runs():
    w = running_world()
    ref = {"step": 20, "uri": "s3://b/ckpt/step-00000020/", "time": "2026-01-01T00:00:09Z"}
    body = {"step": 23, "totalSteps": 100, "updatedAt": "2026-01-01T00:00:10Z", "lastCheckpoint": ref}
    assert w.reconcile(progress=("j-a1-w0", body))["lastCheckpoint"] == ref
    # a resumed trainer names the same checkpoint without its commit time: the time stays
    resumed = {**body, "updatedAt": "2026-01-01T00:00:20Z", "lastCheckpoint": {"step": 20, "uri": ref["uri"]}}
    assert w.reconcile(progress=("j-a1-w0", resumed))["lastCheckpoint"] == ref
    # what is not a checkpoint reference changes nothing
    for bad in ({"uri": "s3://b/x/"}, {"step": -1}, "step-20", None):
        later = {**body, "updatedAt": "2026-01-01T00:00:30Z", "lastCheckpoint": bad}
        assert w.reconcile(progress=("j-a1-w0", later))["lastCheckpoint"] == ref


def test_progress_formatting():
    assert (
        format_eta(None) is None
        and format_eta(42) == "42s"
        and format_eta(125) == "2m5s"
        and format_eta(7260) == "2h1m"
    )
    p = progress_from_trainer({"step": 5, "totalSteps": 10, "loss": "bad", "evalLoss": 1.5})
    assert p == {"step": 5, "totalSteps": 10, "summary": "5/10 (50%)", "evalLoss": 1.5}


def test_an_unschedulable_job_with_auto_gpu_memory_names_the_estimate():
    refusal = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    refusal["message"] = "0/9 nodes are available: 9 node(s) didn't match Pod's node affinity/selector."
    w = World(job(model={"name": "codellama/CodeLlama-7b-hf"}))
    w.reconcile()
    w.pods["j-a1-w0"]["status"] = {"phase": "Pending", "conditions": [refusal]}
    st = w.reconcile()
    assert st["reason"] == "Unschedulable" and "didn't match Pod's node affinity" in st["message"]
    assert "minGpuMemoryMiB auto: the job's estimate is" in st["message"]
    # a number the user chose needs no explanation; nor does an unknown model
    for resources in ({"accelerator": "nvidia", "minGpuMemoryMiB": 40000}, {"accelerator": "nvidia"}):
        model = {"name": "codellama/CodeLlama-7b-hf"} if "minGpuMemoryMiB" in resources else {"name": "org/m"}
        w = World(job(model=model, resources=resources))
        w.reconcile()
        w.pods["j-a1-w0"]["status"] = {"phase": "Pending", "conditions": [refusal]}
        assert "estimate" not in w.reconcile()["message"]


def running_world() -> World:
    w = World(job())
    w.reconcile()
    w.set_pod("j-a1-w0", "Running", podIP="10.0.0.5")
    w.reconcile()
    return w


def conditions(st: dict) -> dict:
    return {c["type"]: c for c in st.get("conditions") or []}


def test_a_loss_that_is_not_finite_shows_as_none_with_a_warning_and_status_keeps_moving():
    w = running_world()
    at = "2026-01-01T00:00:{:02d}Z".format
    w.reconcile(progress=("j-a1-w0", {"step": 10, "totalSteps": 100, "loss": 0.5, "updatedAt": at(1)}))
    st = w.reconcile(
        progress=("j-a1-w0", {"step": 11, "totalSteps": 100, "loss": float("nan"), "updatedAt": at(2)})
    )
    # the status write is valid JSON (no NaN), the stale 0.5 is not shown as the loss
    json.dumps(st, allow_nan=False)
    assert st["progress"]["step"] == 11 and "loss" not in st["progress"]
    cond = conditions(st)["LossNotFinite"]
    assert cond["status"] == "True" and "nan at step 11" in cond["message"]
    assert [e[1] for e in w.plans[-1].events] == ["LossNotFinite"] and w.plans[-1].events[0][0] == "Warning"
    # still not finite: no second Event; the step keeps moving
    st = w.reconcile(
        progress=("j-a1-w0", {"step": 12, "totalSteps": 100, "loss": float("inf"), "updatedAt": at(3)})
    )
    assert st["progress"]["step"] == 12 and not w.plans[-1].events
    # finite again: the condition turns False, the loss is back
    st = w.reconcile(progress=("j-a1-w0", {"step": 13, "totalSteps": 100, "loss": 0.25, "updatedAt": at(4)}))
    assert conditions(st)["LossNotFinite"]["status"] == "False" and st["progress"]["loss"] == 0.25


def test_a_termination_message_of_the_wrong_types_never_breaks_the_status():
    w = running_world()
    message = {
        "outcome": "succeeded",
        "step": float("nan"),
        "adapter": {"uri": ["x"], "sha256": "a" * 500, "sizeBytes": float("inf")},
        "checkpoint": {"step": -3, "uri": 7, "time": {"a": 1}},
        "evaluation": {"evalLoss": float("nan"), "split": 3},
        "error": {"not": "a string"},
    }
    w.set_pod(
        "j-a1-w0",
        "Succeeded",
        containerStatuses=[{"state": {"terminated": {"exitCode": 0, "message": json.dumps(message)}}}],
    )
    st = w.reconcile()
    json.dumps(st, allow_nan=False)
    assert st["phase"] == "Succeeded"
    # no adapter without its URI; no checkpoint without a valid step
    assert "adapter" not in st and "lastCheckpoint" not in st


JSONISH = hs.recursive(
    hs.none()
    | hs.booleans()
    | hs.integers(min_value=-(2**70), max_value=2**70)
    | hs.floats(allow_nan=True, allow_infinity=True)
    | hs.text(max_size=40),
    lambda children: (
        hs.lists(children, max_size=3) | hs.dictionaries(hs.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
PROGRESS_KEYS = [
    "step",
    "totalSteps",
    "epoch",
    "loss",
    "evalLoss",
    "tokensPerSecond",
    "etaSeconds",
    "updatedAt",
    "phase",
    "lastCheckpoint",
]


@settings(max_examples=300, deadline=None)
@given(hs.dictionaries(hs.sampled_from(PROGRESS_KEYS), JSONISH, max_size=len(PROGRESS_KEYS)))
def test_fuzzed_progress_bodies_always_give_a_valid_status(body):
    w = running_world()
    before = w.job["status"]["progress"]["step"]
    st = w.reconcile(progress=("j-a1-w0", {**body, "updatedAt": "2026-01-01T00:00:10Z"}))
    json.dumps(st, allow_nan=False)  # what the API server would be sent
    p = st["progress"]
    assert isinstance(p["step"], int) and p["step"] >= 0 and isinstance(p["totalSteps"], int)
    assert all(isinstance(p[k], float) for k in ("loss", "evalLoss", "epoch", "tokensPerSecond") if k in p)
    assert st["phase"] == "Running" and before == 0


def test_a_refused_create_backs_off_and_leaves_the_attempt_to_be_created_again():
    w = World(job())
    plan = decide(w.job, [], T0)
    assert plan.create and plan.status["attemptStartTime"]
    st, event, delay = after_refusal(
        plan.status, 403, 'pods "j-a1-w0" is forbidden: exceeded quota', "t", 1, 1
    )
    assert delay == 2.0 and event[:2] == ("Warning", "FailedCreate") and "exceeded quota" in event[2]
    assert "attemptStartTime" not in st and st["phase"] == "Pending" and st["reason"] == "FailedCreate"
    assert conditions(st)["PodsCreated"]["status"] == "False"
    assert [create_backoff(n) for n in (1, 2, 3, 8, 9, 20)] == [2, 4, 8, 256, 300, 300]
    # the next reconcile creates the pods again, and says so once they are
    w.job["status"] = st
    again = decide(w.job, [], T0)
    assert [p["metadata"]["name"] for p in again.create] == ["j-a1-w0"]
    assert again.status["reason"] == "Created" and conditions(again.status)["PodsCreated"]["status"] == "True"


def test_an_invalid_pod_fails_the_job_as_an_invalid_spec():
    plan = decide(job(), [], T0)
    st, event, delay = after_refusal(
        plan.status, 422, 'Pod "j-a1-w0" is invalid: spec.nodeSelector', "t", 1, 1
    )
    assert delay is None and st["phase"] == "Failed" and st["reason"] == "InvalidSpec"
    assert event[:2] == ("Warning", "FailedCreate")
    assert "spec.nodeSelector" in st["message"] and conditions(st)["Failed"]["status"] == "True"


def test_a_policy_violation_fails_the_job_naming_the_field_and_a_fix_is_looked_at_again():
    from kubetune.policy import Policy, violations

    policy = Policy(images=("registry.example.com/",))
    j = job(podOverrides={"image": "docker.io/evil/miner"})
    plan = decide(j, [], T0, violations(j["spec"], policy))
    assert not plan.create and plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert (
        "spec.podOverrides.image: 'docker.io/evil/miner' is not under an allowed prefix"
        in plan.status["message"]
    )
    j["status"] = plan.status
    j["spec"]["podOverrides"]["image"] = "registry.example.com/trainer:1"
    j["metadata"]["generation"] = 2
    again = decide(j, [], T0, violations(j["spec"], policy))
    assert again.create and again.status["phase"] == "Pending"
