"""Goodput: how much of a job's wall time became adapter, and where the rest went.

The ledger travels with the checkpoints, so every attempt of a job adds to the same one:

  useful      seconds of the optimizer steps in the current lineage: the steps that a
              finished run's adapter is made of (each counted in the attempt that did it)
  recomputed  seconds of steps done again: an attempt lost after its last checkpoint
              did steps its successor repeats
  restart     a resumed attempt's own start: loading the model, restoring the checkpoint,
              finding its place in the data stream
  waiting     the rest of the time between two attempts: the old pods stopping, capacity
              (a node) to come back, scheduling, the container and the interpreter starting
  other       what an uninterrupted run spends too: the first start, evaluations,
              periodic checkpoints' pauses (wall - useful - lost)

ratio = useful / (useful + lost): the share of the time spent on training, or lost to
interruptions of training, that became adapter. 1.0 for a run never interrupted.

Pure: the trainer feeds it times (wall clock, seconds since the epoch: the attempts of a
job run on different nodes, whose monotonic clocks do not compare)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LOST = ("recomputed", "restart", "waiting")


@dataclass
class Ledger:
    started_at: float  # when the job's first attempt started (epoch seconds)
    useful: float = 0.0
    recomputed: float = 0.0
    restart: float = 0.0
    waiting: float = 0.0
    steps_recomputed: int = 0
    attempts: int = 1
    last_step_end: float | None = None  # when the lineage's newest step ended

    # -- building ------------------------------------------------------------------------
    @classmethod
    def load(cls, saved) -> Ledger | None:
        """A ledger from a checkpoint's state (read from the bucket: only numbers of the
        right kind are taken; anything else means no ledger)."""
        if not isinstance(saved, dict):
            return None

        def num(key, default=None):
            v = saved.get(key, default)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            return float(v) if ok else None

        started = num("started_at")
        if started is None:
            return None
        fields = {k: num(k, 0.0) for k in ("useful", *LOST)}
        if any(v is None for v in fields.values()):
            return None
        steps, attempts = num("steps_recomputed", 0), num("attempts", 1)
        if steps is None or attempts is None:
            return None
        return cls(
            started_at=started,
            **fields,
            steps_recomputed=int(steps),
            attempts=max(int(attempts), 1),
            last_step_end=num("last_step_end"),
        )

    def resumed(
        self,
        step: int,
        process_start: float,
        loop_start: float,
        last_seen_step: int | None,
        attempt: int = 0,
    ) -> Ledger:
        """This ledger (saved with the checkpoint of `step`) carried into a new attempt that
        started its process at process_start and its training loop at loop_start.
        last_seen_step: the highest step the operator saw the lost attempts reach (None:
        not known; then no step counts as recomputed and the gap is all waiting). attempt:
        the operator's number for this attempt (0: not known), which also counts attempts
        lost before they saved anything."""
        gap = max(process_start - (self.last_step_end or process_start), 0.0)
        lost_steps = max((last_seen_step or 0) - step, 0)
        mean_step = self.useful / step if step > 0 else 0.0
        recomputed = min(lost_steps * mean_step, gap)
        return Ledger(
            started_at=self.started_at,
            useful=self.useful,
            recomputed=self.recomputed + recomputed,
            restart=self.restart + max(loop_start - process_start, 0.0),
            waiting=self.waiting + gap - recomputed,
            steps_recomputed=self.steps_recomputed + lost_steps,
            attempts=max(self.attempts + 1, attempt),
            last_step_end=self.last_step_end,
        )

    def step(self, seconds: float, end: float) -> None:
        """An optimizer step of `seconds` ended at `end`."""
        self.useful += max(seconds, 0.0)
        self.last_step_end = end

    # -- reading -------------------------------------------------------------------------
    def to_state(self) -> dict:
        """What a checkpoint keeps (load() reads it back)."""
        return asdict(self)

    def report(self, now: float) -> dict:
        """The figures as status.goodput and the model card say them (camelCase, rounded)."""
        lost = self.recomputed + self.restart + self.waiting
        wall = max(now - self.started_at, 0.0)
        spent = self.useful + lost
        return {
            "ratio": round(self.useful / spent, 4) if spent > 0 else None,
            "usefulSeconds": round(self.useful, 1),
            "lostSeconds": round(lost, 1),
            "recomputedSeconds": round(self.recomputed, 1),
            "restartSeconds": round(self.restart, 1),
            "waitingSeconds": round(self.waiting, 1),
            "otherSeconds": round(max(wall - spent, 0.0), 1),
            "wallSeconds": round(wall, 1),
            "stepsRecomputed": self.steps_recomputed,
            "attempts": self.attempts,
        }


def summary_line(report: dict) -> str:
    """One line for logs and the model card."""
    ratio = report.get("ratio")
    return (f"goodput {ratio:.3f}" if ratio is not None else "goodput n/a") + (
        f": {report['usefulSeconds']:.0f} s of training became adapter; lost "
        f"{report['recomputedSeconds']:.0f} s to {report['stepsRecomputed']} recomputed step(s), "
        f"{report['restartSeconds']:.0f} s to restarts, {report['waitingSeconds']:.0f} s waiting between "
        f"attempts ({report['attempts']} attempt(s), {report['wallSeconds']:.0f} s wall)"
    )
