"""Leader election's decisions (kubetune.leader), on plain Lease records and an injected
clock: when to create, acquire, renew or wait; the renew deadline; release; the flags."""

from __future__ import annotations

import pytest

from kubetune import cli
from kubetune.leader import (
    ACQUIRE,
    CREATE,
    RENEW,
    WAIT,
    Timings,
    decide,
    election_namespace,
    holder_identity,
    lease_valid,
    observed_change_at,
    release_record,
    renew_overdue,
    timing_problems,
)

ME, OTHER = "kt-0_aaaa", "kt-1_bbbb"
STAMP = "2026-12-03T13:00:00.000000Z"
LATER = "2026-12-03T13:00:05.000000Z"


def held_by(holder: str, transitions: int = 3, duration: int = 15) -> dict:
    return {
        "holderIdentity": holder,
        "leaseDurationSeconds": duration,
        "acquireTime": STAMP,
        "renewTime": STAMP,
        "leaseTransitions": transitions,
    }


def test_no_lease_is_created_with_me_as_holder():
    d = decide(None, 0.0, ME, 100.0, LATER, 15, exists=False)
    assert d.action == CREATE
    assert d.record == {
        "holderIdentity": ME,
        "leaseDurationSeconds": 15,
        "acquireTime": LATER,
        "renewTime": LATER,
        "leaseTransitions": 0,
    }


def test_a_free_lease_is_acquired_at_once():
    free = {**held_by(""), "leaseDurationSeconds": 1}
    d = decide(free, observed_at=100.0, identity=ME, now=100.0, stamp=LATER, lease_duration_s=15)
    assert d.action == ACQUIRE
    assert d.record["holderIdentity"] == ME and d.record["leaseTransitions"] == 4
    assert d.record["acquireTime"] == LATER and d.record["leaseDurationSeconds"] == 15


def test_held_and_fresh_by_local_observation_means_wait():
    # observed changing 14.9 s ago (by our clock), a 15 s lease: still the other's
    assert decide(held_by(OTHER), 100.0, ME, 114.9, LATER, 15).action == WAIT


def test_held_but_unchanged_for_the_lease_duration_is_taken_over():
    d = decide(held_by(OTHER, transitions=3), 100.0, ME, 115.0, LATER, 15)
    assert d.action == ACQUIRE
    assert d.record["holderIdentity"] == ME
    assert d.record["leaseTransitions"] == 4 and d.record["acquireTime"] == LATER


def test_expiry_uses_the_lease_duration_in_the_record_not_mine():
    # the holder wrote 40 s; a standby configured with 15 s must still wait 40 s
    assert decide(held_by(OTHER, duration=40), 100.0, ME, 130.0, LATER, 15).action == WAIT
    assert decide(held_by(OTHER, duration=40), 100.0, ME, 140.0, LATER, 15).action == ACQUIRE


def test_the_renew_time_written_by_another_clock_is_not_trusted():
    # a renewTime an hour in the past (a skewed clock): seen changing just now, so valid
    skewed = {**held_by(OTHER), "renewTime": "2026-12-03T12:00:00.000000Z"}
    assert decide(skewed, 100.0, ME, 101.0, LATER, 15).action == WAIT


def test_my_own_lease_is_renewed_keeping_acquire_time_and_transitions():
    d = decide(held_by(ME, transitions=7), 100.0, ME, 200.0, LATER, 15)
    assert d.action == RENEW
    assert d.record == {
        "holderIdentity": ME,
        "leaseDurationSeconds": 15,
        "acquireTime": STAMP,
        "renewTime": LATER,
        "leaseTransitions": 7,
    }


def test_the_observation_time_moves_only_when_the_record_changes():
    record = held_by(OTHER)
    assert observed_change_at(record, dict(record), previous_at=100.0, now=110.0) == 100.0
    renewed = {**record, "renewTime": LATER}
    assert observed_change_at(record, renewed, previous_at=100.0, now=110.0) == 110.0
    assert observed_change_at(None, record, previous_at=0.0, now=110.0) == 110.0


def test_lease_valid():
    assert lease_valid(held_by(OTHER), 100.0, 114.0)
    assert not lease_valid(held_by(OTHER), 100.0, 115.0)
    assert not lease_valid(held_by(""), 100.0, 100.0)  # no holder: free
    assert not lease_valid(None, 100.0, 100.0)


def test_renew_deadline_bookkeeping():
    assert not renew_overdue(last_renewed_at=100.0, now=109.9, renew_deadline_s=10)
    assert renew_overdue(last_renewed_at=100.0, now=110.0, renew_deadline_s=10)
    assert renew_overdue(None, now=0.0, renew_deadline_s=10)  # never renewed: not leading


def test_release_leaves_no_holder_and_a_one_second_lease():
    assert release_record(held_by(ME, transitions=5), LATER) == {
        "holderIdentity": "",
        "leaseDurationSeconds": 1,
        "acquireTime": LATER,
        "renewTime": LATER,
        "leaseTransitions": 5,
    }
    # the next replica acquires it at once
    assert decide(release_record(held_by(ME), LATER), 100.0, OTHER, 100.0, LATER, 15).action == ACQUIRE


def test_identity_and_namespace():
    assert holder_identity("kt-kubetune-5d9f-abcde", "host", "1a2b") == "kt-kubetune-5d9f-abcde_1a2b"
    assert holder_identity(None, "host", "1a2b") == "host_1a2b"
    assert election_namespace("ops", "pod-ns", "sa-ns") == "ops"
    assert election_namespace(None, "pod-ns", "sa-ns") == "pod-ns"
    assert election_namespace(None, None, "sa-ns\n") == "sa-ns"
    assert election_namespace(None, "", None) == "default"


def test_timings_must_let_the_leader_stop_before_a_standby_starts():
    assert timing_problems(Timings()) == []
    assert timing_problems(Timings(6, 4, 1)) == []
    (problem,) = timing_problems(Timings(10, 10, 2))
    assert "--renew-deadline (10 s) must be shorter than --lease-duration (10 s)" in problem
    (problem,) = timing_problems(Timings(15, 2, 2))
    assert "--retry-period (2 s) must be shorter than --renew-deadline (2 s)" in problem
    assert timing_problems(Timings(15, 10, 0)) == ["--retry-period must be > 0, not 0"]


def test_bad_timings_are_a_usage_error_before_anything_starts(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--leader-elect", "--lease-duration=5", "--renew-deadline=8", "--metrics-port=0"])
    assert done.value.code == cli.EXIT_USAGE
    assert "--renew-deadline (8 s) must be shorter than --lease-duration (5 s)" in capsys.readouterr().err
