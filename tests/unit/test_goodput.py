"""The goodput ledger (kubetune_trainer.goodput): pure arithmetic over attempts."""

from __future__ import annotations

import math

from kubetune_trainer.goodput import Ledger, summary_line


def run_steps(ledger: Ledger, start: float, n: int, seconds: float = 2.0) -> float:
    t = start
    for _ in range(n):
        t += seconds
        ledger.step(seconds, t)
    return t


def test_an_uninterrupted_run_has_goodput_one_and_its_start_counts_as_other():
    ledger = Ledger(started_at=1000.0)
    end = run_steps(ledger, 1010.0, 50)  # 10 s to load the model first
    report = ledger.report(end + 5)  # 5 s of export
    assert report["ratio"] == 1.0 and report["usefulSeconds"] == 100.0
    assert report["lostSeconds"] == 0 and report["otherSeconds"] == 15.0 and report["wallSeconds"] == 115.0


def test_a_hard_loss_charges_the_steps_after_the_checkpoint_as_recomputed_and_the_rest_of_the_gap_as_waiting():
    ledger = Ledger(started_at=0.0)
    t = run_steps(ledger, 10.0, 20)  # steps 1..20 end at t=50; the checkpoint of step 20
    saved = Ledger.load(ledger.to_state())
    # the attempt went on to step 25 (10 s), was lost, and the next process started at t=90
    resumed = saved.resumed(step=20, process_start=90.0, loop_start=96.0, last_seen_step=25)
    assert resumed.steps_recomputed == 5 and resumed.recomputed == 10.0
    assert resumed.waiting == 30.0 and resumed.restart == 6.0 and resumed.attempts == 2
    end = run_steps(resumed, 96.0, 30)
    report = resumed.report(end)
    assert report["usefulSeconds"] == 100.0 and report["lostSeconds"] == 46.0
    assert report["ratio"] == round(100 / 146, 4)
    parts = report["usefulSeconds"] + report["lostSeconds"] + report["otherSeconds"]
    assert math.isclose(parts, report["wallSeconds"]) and t == 50.0
    assert "5 recomputed step(s)" in summary_line(report)


def test_a_notified_loss_recomputes_nothing():
    ledger = Ledger(started_at=0.0)
    run_steps(ledger, 0.0, 10)
    resumed = ledger.resumed(step=10, process_start=30.0, loop_start=33.0, last_seen_step=10)
    assert (resumed.steps_recomputed, resumed.recomputed, resumed.waiting) == (0, 0.0, 10.0)


def test_attempts_lost_before_they_saved_anything_still_count_by_the_operators_number():
    ledger = Ledger(started_at=0.0)
    run_steps(ledger, 0.0, 10)
    # attempts 2 and 3 were taken before their first step; attempt 4 resumes the same checkpoint
    assert ledger.resumed(10, 30.0, 33.0, 10, attempt=4).attempts == 4
    assert ledger.resumed(10, 30.0, 33.0, 10).attempts == 2  # (a local run: not known)


def test_recomputed_time_never_exceeds_the_gap_and_an_unknown_last_step_counts_as_waiting():
    ledger = Ledger(started_at=0.0)
    run_steps(ledger, 0.0, 10)
    # the operator's last seen step is far ahead of what the gap can hold
    resumed = ledger.resumed(step=10, process_start=25.0, loop_start=26.0, last_seen_step=40)
    assert resumed.recomputed == 5.0 and resumed.waiting == 0.0
    unknown = ledger.resumed(step=10, process_start=25.0, loop_start=26.0, last_seen_step=None)
    assert unknown.recomputed == 0.0 and unknown.waiting == 5.0


def test_a_ledger_read_from_the_bucket_takes_only_plain_non_negative_numbers():
    good = Ledger(started_at=5.0, useful=3.0).to_state()
    assert Ledger.load(good) == Ledger(started_at=5.0, useful=3.0)
    for bad in (
        None,
        [],
        "x",
        {**good, "useful": "3"},
        {**good, "waiting": -1},
        {**good, "started_at": None},
        {**good, "restart": float("nan")},
        {**good, "attempts": True},
    ):
        assert Ledger.load(bad) is None, bad
