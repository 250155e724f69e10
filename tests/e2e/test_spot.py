"""Spot market end to end (kubetune_dev.devcluster.spot): the real operator and trainer on the
dev cluster's kubelet nodes, reclaims announced the way the clouds announce them. A
notified reclaim finds the work already saved when SIGTERM comes; a job under a market
that takes its node again and again ends with every reclaim counted as a preemption and
a goodput that adds up."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from kubernetes import client

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune_dev.devcluster.spot import SpotMarket, set_notice_taint
from tests.e2e.helpers import (
    adapter,
    e2e_job,
    pod_log,
    resumed_step,
    trained_steps,
    wait_status,
)
from tests.helpers import kubectl, wait_for
from tests.trainer.conftest import max_abs_diff

pytestmark = pytest.mark.cluster

SPOT_RUNNERS = ["runner-0", "runner-1"]
NOTICE_TAINT = "cloud.google.com/impending-node-termination"


def events(core, ns: str, name: str) -> list[tuple[str, str]]:
    return [
        (e.reason, e.message or "")
        for e in core.list_namespaced_event(ns).items
        if e.involved_object.name == name and e.involved_object.kind == "FineTuneJob"
    ]


def node_of(core, ns: str, pod: str) -> str:
    return core.read_namespaced_pod(pod, ns).spec.node_name


def log_time(line: str) -> dt.datetime:
    return dt.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%f")


@pytest.fixture
def market_nodes_back(core):
    """Whatever a test leaves reclaimed is given back: no notice taint, uncordoned."""
    yield
    for name in [*SPOT_RUNNERS, "runner-2", "gpu-a100-spot-1"]:
        set_notice_taint(core, name, NOTICE_TAINT, False)
        core.patch_node(name, {"spec": {"unschedulable": False}})


def test_a_notified_reclaim_is_saved_before_sigterm_and_the_resume_loses_nothing(
    operator, custom, core, namespace, s3, s3_secret, tiny_model_in_s3, dev_cluster, market_nodes_back
):
    ep = dev_cluster.endpoints.s3
    for name in ("calm", "noticed"):
        job = e2e_job(name, namespace, tiny_model_in_s3, ep)
        job["spec"]["training"]["maxSteps"] = 400  # (0.2 s a step: long enough for a notice)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    wait_status(
        custom, namespace, "noticed", lambda s: (s.get("progress") or {}).get("step", 0) >= 12, 240, "step 12"
    )

    # a notice for a node without kubetune pods changes nothing
    set_notice_taint(core, "gpu-a100-spot-1", NOTICE_TAINT, True)
    node = node_of(core, namespace, "noticed-a1-w0")
    # a notice withdrawn at once: the checkpoint it asked for is harmless, the attempt goes on
    set_notice_taint(core, node, NOTICE_TAINT, True)
    wait_for(
        lambda: any(r == "CheckpointRequested" for r, _ in events(core, namespace, "noticed")),
        30,
        "the checkpoint request of the first notice",
    )
    set_notice_taint(core, node, NOTICE_TAINT, False)
    step = (custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "noticed")["status"])[
        "progress"
    ]["step"]
    st = wait_status(
        custom, namespace, "noticed", lambda s: s["progress"]["step"] >= step + 3, 120, "three more steps"
    )
    assert (st["attempt"], st["preemptions"]) == (1, 0), st
    assert not [e for e in events(core, namespace, "calm") if e[0] == "CheckpointRequested"]
    # the standby the withdrawn notice may have started is deleted; once it is gone, the
    # next notice starts a new one
    wait_for(
        lambda: (
            not [p for p in core.list_namespaced_pod(namespace).items if p.metadata.name == "noticed-a2-w0"]
        ),
        120,
        "the withdrawn notice's standby to be gone",
    )

    # the reclaim: GKE's notice (30 s, scaled to 6 s), then the node's pods are evicted
    market = SpotMarket(core, [node], 0, cloud="gke", time_scale=5, log=print, hard_loss=dev_cluster.lose_pod)
    rec = market.reclaim_now(node)
    assert rec.evicted == [f"{namespace}/noticed-a1-w0"] and not rec.lost_hard, rec

    st = wait_status(
        custom,
        namespace,
        "noticed",
        lambda s: s.get("phase") in ("Succeeded", "Failed"),
        300,
        "noticed to finish",
    )
    market.stop()
    assert st["phase"] == "Succeeded" and (st["preemptions"], st["failures"], st["attempt"]) == (1, 0, 2), st
    first = pod_log(dev_cluster, namespace, "noticed-a1-w0")
    second = pod_log(dev_cluster, namespace, "noticed-a2-w0")
    # the notice's checkpoint was committed before SIGTERM came (a request that finds its
    # step already saved by a periodic checkpoint says so)
    asked = re.findall(
        r"checkpoint requested \(node (\S+): GKE preemption notice.*?\): (?:saving step |step )(\d+)", first
    )
    assert [n for n, _ in asked] == [node, node], first[-3000:]
    noticed_step = int(asked[-1][1])
    lines = first.splitlines()
    committed = next(x for x in lines if f"checkpoint step {noticed_step} committed" in x)
    sigterm = next(x for x in lines if "stop requested (SIGTERM)" in x)
    assert lines.index(committed) < lines.index(sigterm) and log_time(committed) <= log_time(sigterm)
    # the resumed attempt starts at the step attempt 1 stopped at: nothing recomputed
    stopped = resumed_step(second)
    assert stopped == trained_steps(first)[-1] >= noticed_step
    assert st["goodput"]["stepsRecomputed"] == 0 and st["goodput"]["recomputedSeconds"] == 0, st["goodput"]
    assert any(r == "CheckpointRequested" and node in m for r, m in events(core, namespace, "noticed"))
    assert node_of(core, namespace, "noticed-a2-w0") != node
    # attempt 2 was a standby: started at the notice, loaded while attempt 1 trained, and
    # told to start once attempt 1 had stopped (the withdrawn notice's standby was deleted)
    reasons = [r for r, _ in events(core, namespace, "noticed")]
    # (the withdrawn notice may have been too short for its standby to be made at all)
    assert reasons.count("StandbyCreated") - reasons.count("StandbyWithdrawn") == 1, reasons
    standing, told = (
        next(x for x in second.splitlines() if s in x) for s in ("standing by", "told to start")
    )
    assert log_time(standing) <= log_time(told) and log_time(sigterm) < log_time(told), (
        standing,
        sigterm,
        told,
    )

    calm = wait_status(
        custom, namespace, "calm", lambda s: s.get("phase") in ("Succeeded", "Failed"), 300, "calm to finish"
    )
    assert calm["phase"] == "Succeeded" and calm["preemptions"] == 0 and calm["goodput"]["ratio"] == 1.0
    diff = max_abs_diff(adapter(s3, namespace, "noticed"), adapter(s3, namespace, "calm"))
    assert diff <= 1e-5, f"the reclaimed job's adapter differs from the uninterrupted one's by {diff}"
    # -o wide shows the goodput
    out = kubectl(dev_cluster, namespace, "get", "ftj", "calm", "-o", "wide").stdout.splitlines()
    assert "GOODPUT" in out[0].split() and out[1].split()[out[0].split().index("GOODPUT")] == "1", out


def test_a_job_under_a_high_rate_market_counts_every_reclaim_as_a_preemption_and_its_goodput_adds_up(
    operator, custom, core, namespace, s3, s3_secret, tiny_model_in_s3, dev_cluster, market_nodes_back
):
    job = e2e_job("churn", namespace, tiny_model_in_s3, dev_cluster.endpoints.s3)
    job["spec"]["training"]["maxSteps"] = 1200  # about two minutes of steps (0.1 s each)
    # only the spot runners: while both are reclaimed the job waits for capacity
    core.patch_node("runner-2", {"spec": {"unschedulable": True}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    wait_status(custom, namespace, "churn", lambda s: s.get("phase") == "Running", 240, "churn running")

    def the_jobs_node(up: list[str]) -> str | None:
        st = (
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "churn").get("status")
            or {}
        )
        try:
            name = node_of(core, namespace, f"churn-a{st.get('attempt')}-w0")
        except client.ApiException:
            return None
        return name if name in up else None

    # 60 reclaims an hour at time scale 4: one every 15 s on average, 7.5 s of notice; this
    # seed's come 15, 35, 59 and 102 s in, far enough apart that each finds the job running
    # on a node that is up, and the job (1200 steps, restarts) outlives at least two
    market = SpotMarket(
        core,
        SPOT_RUNNERS,
        60,
        seed=5,
        cloud="gke",
        time_scale=4,
        return_s=40,
        max_reclaims=4,
        prefer=the_jobs_node,
        hard_loss=dev_cluster.lose_pod,
    ).start()
    try:
        st = wait_status(
            custom,
            namespace,
            "churn",
            lambda s: s.get("phase") in ("Succeeded", "Failed"),
            600,
            "churn to finish",
        )
    finally:
        market.stop()
    reclaims = market.summary()
    suffered = sum(
        1 for r in reclaims if any(f"{namespace}/churn-" in p for p in r["evicted"] + r["lost_hard"])
    )
    assert suffered >= 2, (reclaims, st)
    assert st["phase"] == "Succeeded", st
    assert (st["preemptions"], st["failures"], st["attempt"]) == (suffered, 0, suffered + 1), (
        st,
        market.summary(),
    )
    g = st["goodput"]
    assert g["attempts"] == suffered + 1 and g["stepsRecomputed"] == 0, g
    assert g["lostSeconds"] > 0 and 0 < g["ratio"] < 1
    parts = g["usefulSeconds"] + g["lostSeconds"] + g["otherSeconds"]
    assert abs(parts - g["wallSeconds"]) <= 0.05 * g["wallSeconds"], g
    # the wall time the logs show: from the first attempt's first line to the final ledger's
    first = pod_log(dev_cluster, namespace, "churn-a1-w0").splitlines()
    last = pod_log(dev_cluster, namespace, f"churn-a{st['attempt']}-w0").splitlines()
    logged = log_time(next(x for x in last if "goodput " in x and "became adapter" in x)) - log_time(first[0])
    assert abs(logged.total_seconds() - g["wallSeconds"]) <= 0.05 * g["wallSeconds"], (logged, g)
    # every attempt after the first resumed where the one before it stopped
    for attempt in range(2, st["attempt"] + 1):
        resumed = resumed_step(pod_log(dev_cluster, namespace, f"churn-a{attempt}-w0"))
        trained = trained_steps(pod_log(dev_cluster, namespace, f"churn-a{attempt - 1}-w0"))
        assert resumed == trained[-1], (attempt, resumed, trained[-3:])
