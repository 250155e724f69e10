"""The operator's small bookkeeping pieces: progress-poll backoff and the jobs-by-phase gauge."""

from kubetune import metrics
from kubetune.runtime import PollBackoff


def test_a_trainer_that_answers_is_asked_every_interval():
    b = PollBackoff(interval_s=10)
    assert b.due("p", 0)
    b.record("p", True, 0)
    assert b.due("p", 0.001)


def test_unanswered_asks_back_off_doubling_up_to_a_minute_and_reset_on_an_answer():
    b = PollBackoff(interval_s=10)
    now, waits = 0.0, []
    for _ in range(5):
        b.record("p", False, now)
        nxt = b.unanswered["p"][1]
        assert not b.due("p", nxt - 0.01) and b.due("p", nxt)
        waits.append(nxt - now)
        now = nxt
    assert waits == [20, 40, 60, 60, 60]
    b.record("p", True, now)
    assert b.due("p", now) and "p" not in b.unanswered
    b.record("p", False, now)
    assert b.unanswered["p"] == (1, now + 20)  # counting starts over


def test_an_interval_longer_than_the_cap_is_never_shortened():
    b = PollBackoff(interval_s=120)
    b.record("p", False, 0)
    assert b.unanswered["p"][1] == 120


def test_pods_no_longer_polled_are_forgotten():
    b = PollBackoff(interval_s=1)
    b.record("old", False, 0)
    b.record("new", False, 0)
    b.keep({"new"})
    assert set(b.unanswered) == {"new"}


def gauge(phase: str) -> float:
    return metrics.JOBS.labels(phase)._value.get()


def test_jobs_by_phase_follow_each_jobs_last_phase():
    before = {p: gauge(p) for p in metrics.PHASES}
    a, b = ("ns", "gauge-a"), ("ns", "gauge-b")
    metrics.set_phase(a, None)  # a job without a phase yet counts as Pending
    metrics.set_phase(b, "Pending")
    metrics.set_phase(b, "Pending")  # no change, no count
    metrics.set_phase(b, "Running")
    assert gauge("Pending") - before["Pending"] == 1
    assert gauge("Running") - before["Running"] == 1
    metrics.set_phase(a, "Succeeded")
    metrics.forget_job(b)
    metrics.forget_job(b)  # a second delete event changes nothing
    assert {p: gauge(p) - before[p] for p in metrics.PHASES} == {
        "Pending": 0,
        "Running": 0,
        "Preempted": 0,
        "Suspended": 0,
        "Succeeded": 1,
        "Failed": 0,
    }
    metrics.forget_job(a)
    assert {p: gauge(p) for p in metrics.PHASES} == before
