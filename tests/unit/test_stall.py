"""The stall check: when a running attempt counts as stuck, and which rank is named."""

from __future__ import annotations

import datetime as dt

from kubetune.decision.decide import decide
from kubetune.stall import STALL_MIN_S, RankSeen, RankWatch, Stall, find_stall, stall_limit
from tests.helpers import finetune_job


def seen(rank: int, step: int, since: float, answered=True, activity="compute", phase="training", step_s=1.0):
    return RankSeen(rank, f"j-a1-w{rank}", f"node-{rank}", step, since, answered, phase, activity, step_s)


def test_the_limit_is_the_deadline_or_many_step_times_but_never_under_ten_minutes():
    assert stall_limit(30, 5.0) == 30
    assert stall_limit(None, 1.0) == STALL_MIN_S
    assert stall_limit(None, 60.0) == 1200
    assert stall_limit(None, None) == STALL_MIN_S


def test_a_job_still_stepping_is_not_stalled():
    assert find_stall([seen(0, 10, 100.0), seen(1, 10, 100.0)], now=120.0, deadline_s=30) is None
    # one rank moved recently: the attempt is moving
    assert find_stall([seen(0, 10, 0.0), seen(1, 11, 100.0)], now=120.0, deadline_s=30) is None


def test_loading_checkpointing_and_evaluating_never_count():
    for phase in ("loading", "checkpointing", "evaluating", "uploading"):
        assert find_stall([seen(0, 10, 0.0, phase=phase), seen(1, 10, 0.0)], 1e6, 30) is None


def test_a_silent_rank_is_named_first():
    stall = find_stall([seen(0, 10, 0.0), seen(1, 10, 0.0, answered=False)], now=40.0, deadline_s=30)
    assert stall == Stall(
        "j-a1-w1",
        1,
        "node-1",
        "no optimizer step for 40 s (deadline 30 s, spec.progressDeadlineSeconds): "
        "rank 1 stopped answering /progress at step 10",
    )


def test_a_rank_stuck_reading_or_behind_is_named_then_rank0_for_a_hung_collective():
    reading = find_stall([seen(0, 10, 0.0), seen(1, 10, 0.0, activity="data")], 40.0, 30)
    assert reading.rank == 1 and "reading its data" in reading.message
    behind = find_stall([seen(0, 11, 0.0), seen(1, 10, 0.0), seen(2, 11, 0.0)], 40.0, 30)
    assert behind.rank == 1 and "behind at step 10" in behind.message
    hung = find_stall([seen(0, 10, 0.0), seen(1, 10, 0.0)], 40.0, 30)
    assert hung.rank == 0 and "every rank waits at step 10" in hung.message


def test_the_watch_times_a_step_from_when_it_changed_and_ignores_what_is_not_a_step():
    w, p = RankWatch(), ("ns", "p")
    w.asked(p, 0, "n", now=0.0)
    w.answered(p, {"step": 5, "phase": "training", "stepSeconds": 0.5}, now=1.0)
    w.answered(p, {"step": 5, "phase": "training"}, now=50.0)  # same step: since unchanged
    (r,) = w.ranks([p])
    assert (r.pod, r.step, r.since, r.answered, r.step_seconds) == ("p", 5, 1.0, True, None)
    w.answered(p, None, now=60.0)
    assert not w.ranks([p])[0].answered and w.ranks([p])[0].since == 1.0
    w.answered(p, {"step": "6", "phase": ["x"], "stepSeconds": float("nan")}, now=70.0)
    (r,) = w.ranks([p])
    assert r.step is None and r.phase is None and r.step_seconds is None
    w.keep(set())
    assert w.ranks([p]) == []


def test_time_spent_loading_or_evaluating_never_counts_as_time_without_a_step():
    """A 15-minute model load, then training at step 0; an evaluation longer than the
    deadline: the clock restarts when the rank is back to training."""
    w, p = RankWatch(), ("ns", "j-a1-w0")
    w.asked(p, 0, "n", now=0.0)
    w.answered(p, {"step": 0, "phase": "loading"}, now=1.0)
    w.answered(p, {"step": 0, "phase": "loading"}, now=899.0)
    w.answered(p, {"step": 0, "phase": "training"}, now=901.0)
    assert find_stall(w.ranks([p]), now=905.0, deadline_s=None) is None
    w.answered(p, {"step": 10, "phase": "training"}, now=950.0)
    w.answered(p, {"step": 10, "phase": "evaluating"}, now=960.0)
    w.answered(p, {"step": 10, "phase": "evaluating"}, now=1040.0)
    w.answered(p, {"step": 10, "phase": "training"}, now=1041.0)
    assert find_stall(w.ranks([p]), now=1050.0, deadline_s=60) is None
    assert find_stall(w.ranks([p]), now=1102.0, deadline_s=60) is not None


def test_two_namespaces_with_a_job_of_the_same_name_are_watched_apart():
    w = RankWatch()
    a, b = ("team-a", "llm-a1-w0"), ("team-b", "llm-a1-w0")
    for pod in (a, b):
        w.asked(pod, 0, "n", now=0.0)
    w.answered(a, {"step": 3, "phase": "training"}, now=1.0)
    w.answered(b, {"step": 7, "phase": "training"}, now=100.0)
    assert find_stall(w.ranks([a]), now=120.0, deadline_s=30) is not None
    assert find_stall(w.ranks([b]), now=120.0, deadline_s=30) is None


def test_a_rank_never_heard_from_is_left_out_and_a_short_deadline_waits_for_several_polls():
    never = RankSeen(1, "j-a1-w1", None, since=0.0)
    stall = find_stall([seen(0, 10, 0.0), never], now=40.0, deadline_s=30)
    assert stall is not None and stall.rank == 0
    # polled every 10 s, 6 polls (60 s) at least, whatever the deadline says
    assert find_stall([seen(0, 10, 0.0)], now=40.0, deadline_s=30, poll_s=10.0) is None
    assert find_stall([seen(0, 10, 0.0)], now=61.0, deadline_s=30, poll_s=10.0) is not None


def running_job(workers=2):
    return finetune_job(
        "j",
        {  # no resources: the spec's defaults
            "model": {"name": "org/m"},
            "dataset": {"uri": "s3://data/x/"},
            "checkpoint": {"uri": "s3://ckpt/x/"},
            "output": {"uri": "s3://out/x/"},
        },
        metadata={"uid": "u", "generation": 1, "namespace": "ns"},
        status={
            "phase": "Running",
            "attempt": 1,
            "attemptStartTime": "2026-01-01T00:00:00Z",
            "preemptions": 0,
            "failures": 0,
            "startTime": "2026-01-01T00:00:00Z",
        },
        typed=False,
        workers=workers,
    )


def running_pod(rank):
    return {
        "metadata": {
            "name": f"j-a1-w{rank}",
            "labels": {"kubetune.io/attempt": "1", "kubetune.io/rank": str(rank)},
        },
        "spec": {"nodeName": f"node-{rank}"},
        "status": {"phase": "Running", "podIP": f"10.0.0.{rank + 1}"},
    }


def test_a_stalled_attempt_is_replaced_as_a_failure_naming_the_rank():
    now = dt.datetime(2026, 1, 1, 1, tzinfo=dt.UTC)
    stall = Stall("j-a1-w1", 1, "node-1", "no optimizer step for 40 s: rank 1 stopped answering")
    plan = decide(running_job(), [running_pod(0), running_pod(1)], now, stall=stall)
    assert plan.status["failures"] == 1 and plan.status["attempt"] == 2
    assert sorted(plan.delete) == ["j-a1-w0", "j-a1-w1"]
    (event,) = [e for e in plan.events if e[1] == "AttemptFailed"]
    assert "worker j-a1-w1 on node node-1: Stalled: no optimizer step for 40 s" in event[2]
    # a stall of an earlier attempt's pod does not touch the current one
    old = Stall("j-a0-w1", 1, "node-1", "old")
    again = decide(running_job(), [running_pod(0), running_pod(1)], now, stall=old)
    assert again.status["attempt"] == 1 and not again.delete
