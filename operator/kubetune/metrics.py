"""Operator metrics (Prometheus): jobs by phase, reconcile latency, time from a job's
first sight to its pods' creation, pod losses by kind and reason."""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kubetune.api import Phase

JOBS = Gauge("kubetune_jobs", "FineTuneJobs by phase", ["phase"])
RECONCILE = Histogram(
    "kubetune_reconcile_seconds",
    "Time of one reconcile",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PODS_CREATED = Histogram(
    "kubetune_job_pods_created_seconds",
    "From a job's first sight to its pods' creation",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LOSSES = Counter("kubetune_pod_losses_total", "Worker pod losses", ["kind", "reason"])
NOTICES = Counter("kubetune_node_termination_notices_total", "Termination notices seen on nodes", ["source"])
CHECKPOINT_REQUESTS = Counter(
    "kubetune_checkpoint_requests_total", "Checkpoints asked of trainers on nodes under notice"
)
GOODPUT = Gauge("kubetune_job_goodput_ratio", "useful / (useful + lost) per job", ["namespace", "job"])
GOODPUT_SECONDS = Gauge(
    "kubetune_job_goodput_seconds",
    "Seconds per job: useful, or lost to recomputed steps, restarts, waiting",
    ["namespace", "job", "kind"],
)
LEADER = Gauge("kubetune_leader", "1 while this replica acts (holds the Lease), 0 while it stands by")
GOODPUT_KINDS = {
    "useful": "usefulSeconds",
    "recomputed": "recomputedSeconds",
    "restart": "restartSeconds",
    "waiting": "waitingSeconds",
}

PHASES = tuple(p.value for p in Phase)
_phases: dict = {}
_lock = threading.Lock()


def set_phase(key, phase: str | None) -> None:
    # one gauge step per change: recounting every job on every reconcile made a burst
    # of n new jobs cost n^2
    phase = phase or Phase.pending.value
    with _lock:
        old = _phases.get(key)
        if old == phase:
            return
        _phases[key] = phase
        if old is not None:
            JOBS.labels(old).dec()
        JOBS.labels(phase).inc()


def forget_job(key) -> None:
    with _lock:
        old = _phases.pop(key, None)
        if old is not None:
            JOBS.labels(old).dec()
    for labels in ((*key,), *((*key, kind) for kind in GOODPUT_KINDS)):
        gauge = GOODPUT if len(labels) == 2 else GOODPUT_SECONDS
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)


def set_goodput(key, goodput: dict | None) -> None:
    """A job's status.goodput as gauges (nothing until its trainer reported one)."""
    if not goodput:
        return
    if goodput.get("ratio") is not None:
        GOODPUT.labels(*key).set(goodput["ratio"])
    for kind, field in GOODPUT_KINDS.items():
        if goodput.get(field) is not None:
            GOODPUT_SECONDS.labels(*key, kind).set(goodput[field])


def set_leader(leading: bool) -> None:
    LEADER.set(1 if leading else 0)


def count_notice(source: str) -> None:
    NOTICES.labels(source).inc()


def count_checkpoint_request() -> None:
    CHECKPOINT_REQUESTS.inc()


for _phase in PHASES:  # every phase is exported, at 0 until a job is in it
    JOBS.labels(_phase)


def observe_reconcile(seconds: float) -> None:
    RECONCILE.observe(seconds)


def observe_pods_created(seconds: float) -> None:
    PODS_CREATED.observe(seconds)


def count_loss(kind: str, reason: str) -> None:
    LOSSES.labels(kind, reason).inc()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr)
