"""A trainer that stops making progress: every rank of a running attempt answers GET
/progress with its own step; when no rank has finished an optimizer step for many times
the usual step time, the attempt is stuck (a collective waiting for a peer that hangs, a
read that never returns) and is replaced as a failure, naming the rank that holds it up.

Times are the operator's own monotonic clock (when it saw a step change), never the
trainer's: a node's clock may be off. Pure logic (find_stall) plus the record of what
each rank said (RankWatch), fed by the progress poller."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kubetune.decision.reports import count, finite, text

STALL_FACTOR = 20  # the usual step time, times this, without a step: stuck
STALL_MIN_S = 600.0  # never sooner than this unless spec.progressDeadlineSeconds says so
# and never sooner than this many progress polls: one unanswered poll (a dropped request)
# must not look like a stuck trainer
STALL_MIN_POLLS = 6


@dataclass
class RankSeen:
    rank: int
    pod: str  # its name
    node: str | None
    step: int | None = None
    since: float = 0.0  # when this step was first seen (or the rank first asked)
    answered: bool = False  # whether the last ask got an answer
    phase: str | None = None
    activity: str | None = None
    step_seconds: float | None = None


@dataclass(frozen=True)
class Stall:
    pod: str
    rank: int
    node: str | None
    message: str


def stall_limit(deadline_s: float | None, step_seconds: float | None, poll_s: float = 0.0) -> float:
    auto = max(STALL_FACTOR * (step_seconds or 0.0), STALL_MIN_S)
    return max(float(deadline_s) if deadline_s else auto, STALL_MIN_POLLS * poll_s)


def find_stall(
    ranks: list[RankSeen], now: float, deadline_s: float | None, poll_s: float = 0.0
) -> Stall | None:
    """Whether the attempt these ranks make up is stuck, and the rank to name. Only while
    training: loading, checkpointing and evaluating have their own pace (a rank's time
    without a step counts from its return to training). A rank never heard from (still
    starting, or its progress port unreachable) is left out."""
    ranks = [r for r in ranks if r.step is not None]
    if not ranks or any(r.phase != "training" for r in ranks):
        return None
    rank0 = min(ranks, key=lambda r: r.rank)
    limit = stall_limit(deadline_s, rank0.step_seconds, poll_s)
    idle = min(now - r.since for r in ranks)  # since the latest step of any rank
    if idle < limit:
        return None
    why = (
        f"deadline {limit:.0f} s, spec.progressDeadlineSeconds"
        if deadline_s
        else (f"{STALL_FACTOR}x the usual step time, at least {STALL_MIN_S:.0f} s")
    )
    head = f"no optimizer step for {idle:.0f} s ({why})"
    silent = [r for r in ranks if not r.answered]
    reading = [r for r in ranks if r.activity == "data"]
    lowest = min(r.step for r in ranks)
    behind = [r for r in ranks if r.step == lowest] if lowest < max(r.step for r in ranks) else []
    if silent:
        culprit, what = (
            silent[0],
            f"rank {silent[0].rank} stopped answering /progress at step {silent[0].step}",
        )
    elif reading:
        culprit, what = (
            reading[0],
            f"rank {reading[0].rank} has been reading its data since step {reading[0].step}",
        )
    elif behind:
        culprit, what = behind[0], f"rank {behind[0].rank} is behind at step {lowest}"
    else:
        culprit, what = rank0, f"every rank waits at step {lowest} (a collective that never completes)"
    return Stall(culprit.pod, culprit.rank, culprit.node, f"{head}: {what}")


class RankWatch:
    """What each polled trainer pod last said, and since when its step has stood still.
    Written by the poller's fetcher threads, read by the poll loop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict = {}  # (namespace, pod name) -> RankSeen

    def asked(self, pod: tuple[str, str], rank: int, node: str | None, now: float) -> None:
        with self.lock:
            self.seen.setdefault(pod, RankSeen(rank, pod[1], node, since=now))

    def answered(self, pod: tuple[str, str], body: dict | None, now: float) -> None:
        with self.lock:
            r = self.seen.get(pod)
            if r is None:
                return
            r.answered = body is not None
            if body is None:
                return
            step, phase = count(body.get("step")), text(body.get("phase"), 32)
            if step != r.step or phase != r.phase or phase != "training":
                # a new step, or time that is not training's (loading, evaluating,
                # checkpointing): the clock starts again
                r.since = now
            r.step, r.phase = step, phase
            r.activity = text(body.get("activity"), 32)
            r.step_seconds = finite(body.get("stepSeconds"))

    def rank(self, pod: tuple[str, str]) -> int | None:
        """The rank the pod was asked as (None: not polled now)."""
        with self.lock:
            r = self.seen.get(pod)
            return r.rank if r else None

    def ranks(self, pods: list) -> list[RankSeen]:
        with self.lock:
            return [self.seen[p] for p in pods if p in self.seen]

    def keep(self, pods: set) -> None:
        with self.lock:
            for pod in set(self.seen) - pods:
                del self.seen[pod]
