"""The operator's small bookkeeping pieces: the jobs-by-phase gauge (the progress-poll
backoff's tests are in test_runtime.py)."""

from kubetune import metrics


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
