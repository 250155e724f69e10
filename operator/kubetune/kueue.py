"""Kueue's preemption-cost signal from the age of a job's last checkpoint.

Kueue (KEP-7990, feature gate PriorityBoost, alpha) orders preemption candidates by an
effective priority: the Workload's priority plus the integer in its annotation
`kueue.x-k8s.io/priority-boost`. A job that just committed a checkpoint loses almost
nothing when preempted; one whose checkpoint is old loses everything since. So the boost
is lowest (PRIORITY_BOOST_RANGE below the priority) right after a checkpoint and rises to
0 as the checkpoint ages over `horizon_s`: among jobs of one priority, Kueue then preempts
the one whose last checkpoint is newest. The value moves in steps (BOOST_STEP), so the
annotation changes a few times per checkpoint interval, not on every reconcile."""

from __future__ import annotations

import math

PRIORITY_BOOST_ANNOTATION = "kueue.x-k8s.io/priority-boost"
PRIORITY_BOOST_RANGE = 100
BOOST_STEP = 10


def priority_boost(checkpoint_age_s: float | None, horizon_s: float = 1800.0) -> int:
    """The annotation's value for a job whose newest checkpoint is checkpoint_age_s old
    (None: it has none yet, so a preemption loses everything: no boost down)."""
    if checkpoint_age_s is None or not math.isfinite(checkpoint_age_s) or horizon_s <= 0:
        return 0
    fresh = 1.0 - min(max(checkpoint_age_s, 0.0), horizon_s) / horizon_s  # 1 new .. 0 old
    steps = math.ceil(fresh * PRIORITY_BOOST_RANGE / BOOST_STEP)
    return -steps * BOOST_STEP
