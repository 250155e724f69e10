"""The preemption-cost signal for Kueue (kubetune.kueue.priority_boost) over time."""

from __future__ import annotations

import pytest

from kubetune.kueue import BOOST_STEP, PRIORITY_BOOST_RANGE, priority_boost


def test_a_fresh_checkpoint_makes_the_job_the_cheapest_to_preempt_and_the_boost_rises_to_zero_with_age():
    values = [priority_boost(age, horizon_s=1800) for age in range(0, 2400, 30)]
    assert values[0] == -PRIORITY_BOOST_RANGE
    assert values == sorted(values), "the boost never falls as the checkpoint ages"
    assert priority_boost(1800, horizon_s=1800) == 0 and priority_boost(10_000, horizon_s=1800) == 0
    assert all(v % BOOST_STEP == 0 for v in values)
    assert len(set(values)) <= PRIORITY_BOOST_RANGE // BOOST_STEP + 1, "a few annotation writes per horizon"


def test_of_two_jobs_the_newer_checkpoint_gets_the_lower_effective_priority():
    priority = 1000
    newest, older = priority + priority_boost(60), priority + priority_boost(900)
    assert newest < older


@pytest.mark.parametrize("age", [None, float("nan"), float("inf")])
def test_no_checkpoint_or_a_nonsense_age_means_no_boost(age):
    assert priority_boost(age) == 0


def test_a_clock_skewed_negative_age_counts_as_fresh():
    assert priority_boost(-5) == -PRIORITY_BOOST_RANGE
