"""The operator's pod cache, driven by the real Controller with events in the order the
API server sends them: only pods a FineTuneJob made are cached, and nothing of a deleted
job stays, however many jobs come and go."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from kubetune.api import GROUP, KIND, VERSION
from kubetune.handlers import Controller
from kubetune.manifests import ATTEMPT_LABEL, JOB_LABEL, RANK_LABEL, owner_reference
from tests.helpers import finetune_job


def job(name: str, uid: str, rv: int = 1) -> dict:
    return finetune_job(
        name,
        {},
        metadata={"namespace": "ns", "uid": uid, "resourceVersion": str(rv), "generation": 1},
        typed=False,
    )


def pod(job_name: str, uid: str | None, rank: int = 0, rv: int = 1, exit_code: int | None = None) -> dict:
    meta = {
        "namespace": "ns",
        "name": f"{job_name}-a1-w{rank}",
        "resourceVersion": str(rv),
        "labels": {JOB_LABEL: job_name, ATTEMPT_LABEL: "1", RANK_LABEL: str(rank)},
    }
    if uid is not None:
        meta["ownerReferences"] = [owner_reference(job_name, uid)]
    state = {"terminated": {"exitCode": exit_code}} if exit_code is not None else {"running": {}}
    return {
        "metadata": meta,
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": state}]},
    }


def controller() -> Controller:
    c = Controller(kube=None, workers=1)
    c.pool.shutdown()
    c.events.shutdown()
    return c


def with_controller(body) -> None:
    """body(controller) inside an event loop (the work queue's timers need one), then the
    queue drained."""

    async def run():
        c = controller()
        body(c)
        drain(c)

    asyncio.run(run())


def drain(c: Controller) -> None:
    """What the workers do with the queue, minus the reconcile: take every key."""
    while not c.queue.queue.empty():
        c.queue.done(c.queue.queue.get_nowait())
    c.queue.queued.clear()
    for timer in c.queue.timers.values():
        timer.cancel()
    c.queue.timers.clear()


def test_pods_not_made_by_a_finetunejob_are_not_cached_whatever_their_labels():
    def body(c: Controller) -> None:
        c.job_event("ADDED", job("victim", "u1"))
        c.pod_event("ADDED", pod("victim", None))  # the labels, no owner
        foreign = pod("victim", "u1", rank=1)
        foreign["metadata"]["ownerReferences"][0]["kind"] = "Job"  # another controller
        c.pod_event("ADDED", foreign)
        assert ("ns", "victim") not in c.pods
        c.pod_event("ADDED", pod("victim", "u1"))
        assert list(c.pods[("ns", "victim")]) == ["victim-a1-w0"]

    with_controller(body)


def test_losing_the_last_pod_of_a_job_queues_its_reconcile():
    """A force-deleted pod (grace 0, or the pod GC after a node is lost) must be noticed
    at once, not at the next resync."""

    def body(c: Controller) -> None:
        c.job_event("ADDED", job("solo", "u1"))
        drain(c)
        c.pod_event("ADDED", pod("solo", "u1"))
        drain(c)
        c.pod_event("DELETED", pod("solo", "u1", rv=2))  # still running: gone without a word
        assert ("ns", "solo") not in c.pods
        assert ("ns", "solo") in c.queue.timers

    with_controller(body)


def test_a_pod_whose_owner_reference_is_taken_away_leaves_the_cache():
    def body(c: Controller) -> None:
        c.job_event("ADDED", job("j", "u1"))
        c.pod_event("ADDED", pod("j", "u1"))
        c.pod_event("MODIFIED", pod("j", None, rv=2))
        assert ("ns", "j") not in c.pods

    with_controller(body)


def test_a_deleted_job_leaves_no_stall_or_progress_behind():
    def body(c: Controller) -> None:
        c.job_event("ADDED", job("j", "u1"))
        c.stalls[("ns", "j")] = object()
        c.progress[("ns", "j")] = ("j-a1-w0", {})
        c.job_event("DELETED", job("j", "u1"))
        assert not c.stalls and not c.progress

    with_controller(body)


def test_a_reconcile_counts_only_the_pods_of_this_job_not_an_earlier_one_of_its_name():
    new = job("same", "new-uid")
    pods = [pod("same", "old-uid", rank=0), pod("same", "new-uid", rank=1)]
    assert [p["metadata"]["name"] for p in Controller._owned(new, pods)] == ["same-a1-w1"]


def test_an_evicted_pods_last_state_is_kept_only_while_its_job_exists():
    def body(c: Controller) -> None:
        c.job_event("ADDED", job("kept", "u1"))
        c.pod_event("ADDED", pod("kept", "u1"))
        c.pod_event("DELETED", pod("kept", "u1", rv=2, exit_code=75))
        # the exit code and termination message must reach the next reconcile
        assert c.pods[("ns", "kept")]["kept-a1-w0"]["status"]["containerStatuses"][0]["state"]["terminated"]
        c.job_event("DELETED", job("kept", "u1"))
        assert ("ns", "kept") not in c.pods

    with_controller(body)


def test_a_late_delete_of_an_earlier_pod_of_the_same_name_leaves_its_successor_cached():
    """A standby deleted and made again at once: the old pod's DELETED may come after the
    new one is cached (the operator caches what its create returned)."""

    def incarnation(uid: str, rv: int, exit_code=None) -> dict:
        p = pod("again", "u1", rv=rv, exit_code=exit_code)
        p["metadata"]["uid"] = uid
        return p

    def body(c: Controller) -> None:
        c.job_event("ADDED", job("again", "u1"))
        c.pod_event("ADDED", incarnation("old", 1))
        c.pod_event("ADDED", incarnation("new", 5))
        for last_state in (incarnation("old", 4, exit_code=137), incarnation("old", 4)):
            c.pod_event("DELETED", last_state)
            assert c.pods[("ns", "again")]["again-a1-w0"]["metadata"]["uid"] == "new"
        c.pod_event("DELETED", incarnation("new", 6))
        assert ("ns", "again") not in c.pods

    with_controller(body)


def test_memory_stays_flat_over_thousands_of_job_create_delete_cycles():
    """Jobs are deleted before their pods (the garbage collector deletes the pods once the
    job is gone): the pods' last events arrive for a job the operator has forgotten."""

    def cycle(c: Controller, i: int) -> None:
        name, uid = f"job-{i}", f"uid-{i}"
        c.job_event("ADDED", job(name, uid))
        for rank in (0, 1):
            c.pod_event("ADDED", pod(name, uid, rank, rv=1))
            c.pod_event("MODIFIED", pod(name, uid, rank, rv=2, exit_code=0))
        c.job_event("DELETED", job(name, uid, rv=3))
        for rank in (0, 1):
            c.pod_event("MODIFIED", pod(name, uid, rank, rv=4, exit_code=0))
            c.pod_event("DELETED", pod(name, uid, rank, rv=5, exit_code=0))
        drain(c)

    async def run():
        c = controller()
        for i in range(500):  # warm up: the interpreter's and the loop's own caches
            cycle(c, i)
            await asyncio.sleep(0)  # the loop's turn (it drops the timers drain cancelled)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(500, 3500):
            cycle(c, i)
            await asyncio.sleep(0)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        assert not c.pods and not c.jobs and not c.first_seen
        # 3,000 cached pod bodies would be well over a megabyte
        assert grown < 100_000, f"{grown} bytes more after 3,000 jobs came and went"

    asyncio.run(run())


def test_owner_reference_helper_matches_the_operators_own_objects():
    ref = owner_reference("a", "u")
    assert (ref["apiVersion"], ref["kind"], ref["controller"]) == (f"{GROUP}/{VERSION}", KIND, True)
