"""The controller runtime's guarantees, with a real event loop and real worker threads:
the work queue's (one worker per key, a change while processed is processed once more,
duplicates collapse, the earliest wake-up wins), the token bucket's, the poll backoff's,
and the job cache's thread rule."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
import time

import pytest

from kubetune.handlers import Controller
from kubetune.manifests import JOB_LABEL, owner_reference
from kubetune.runtime import (
    LAST_APPLIED,
    LIST_PAGE,
    Handoff,
    JobCache,
    PollBackoff,
    TokenBucket,
    WorkQueue,
    slim,
    watch_collection,
    watch_objects,
    worker,
)
from tests.helpers import wait_for


async def until(condition, timeout_s: float = 10.0) -> None:
    """Let the loop run until condition() holds."""

    async def poll():
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout_s)


def idle(queue: WorkQueue) -> bool:
    return not (queue.queued or queue.active or queue.dirty or queue.timers)


def run_workers(queue: WorkQueue, reconcile, workers: int):
    """Workers on the loop and a pool of as many threads; a stop() for the end of the test."""
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="test-reconcile")
    tasks = [asyncio.ensure_future(worker(queue, pool, reconcile, retry_s=0.01)) for _ in range(workers)]

    async def stop():
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # off the loop: a reconcile still running may wait on the loop to finish
        await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)

    return stop


class Overlaps:
    """Records which keys are being reconciled, and any key reconciled twice at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy: set = set()
        self.overlaps: list = []
        self.count: dict = {}

    def enter(self, key) -> None:
        with self.lock:
            if key in self.busy:
                self.overlaps.append(key)
            self.busy.add(key)
            self.count[key] = self.count.get(key, 0) + 1

    def leave(self, key) -> None:
        with self.lock:
            self.busy.discard(key)


def loop_round(loop) -> None:
    """From a worker thread: wait until the loop ran everything scheduled before."""
    ran = threading.Event()
    loop.call_soon_threadsafe(ran.set)
    assert ran.wait(10)


def test_a_key_is_never_reconciled_by_two_workers_at_once():
    keys = [("ns", f"job-{i}") for i in range(3)]
    seen = Overlaps()
    holders_ok = []

    async def main():
        loop = asyncio.get_running_loop()
        queue = WorkQueue()

        def reconcile(key):
            seen.enter(key)
            try:
                holders_ok.append(queue.holder(key) == threading.get_ident())
                # the key is added again while processed, and the loop gets turns meanwhile:
                # a queue without the guarantee hands it to another idle worker now
                loop.call_soon_threadsafe(queue.add, key)
                loop_round(loop)
                loop_round(loop)
            finally:
                seen.leave(key)

        stop = run_workers(queue, reconcile, workers=16)
        try:
            for _ in range(300):
                for key in keys:
                    queue.add(key)
                await asyncio.sleep(0)
            await until(lambda: all(seen.count.get(k, 0) >= 50 for k in keys))
        finally:
            await stop()

    asyncio.run(main())
    assert not seen.overlaps
    assert holders_ok and all(holders_ok)


def test_a_key_added_while_being_reconciled_is_reconciled_again_exactly_once_after_done():
    key = ("ns", "j")
    seen = Overlaps()
    first_started, release = threading.Event(), threading.Event()

    async def main():
        queue = WorkQueue()

        def reconcile(k):
            seen.enter(k)
            try:
                if seen.count[k] == 1:
                    first_started.set()
                    assert release.wait(10)
            finally:
                seen.leave(k)

        stop = run_workers(queue, reconcile, workers=4)
        try:
            queue.add(key)
            await until(first_started.is_set)
            for _ in range(5):
                queue.add(key)  # changed, changed again...: one more reconcile covers them all
            assert key in queue.dirty and key not in queue.queued
            release.set()
            await until(lambda: seen.count[key] == 2 and idle(queue))
            for _ in range(10):  # give a third reconcile every chance to happen
                await asyncio.sleep(0)
            assert seen.count[key] == 2 and idle(queue)
        finally:
            await stop()

    asyncio.run(main())
    assert not seen.overlaps


def test_duplicate_adds_while_queued_collapse_into_one():
    async def main():
        queue = WorkQueue()
        for _ in range(10):
            queue.add("a")
        queue.add("b")
        assert queue.queue.qsize() == 2 and queue.queued == {"a", "b"}
        assert await queue.get() == "a"
        queue.add("a")  # now being processed: marked dirty, not queued a second time
        assert queue.queue.qsize() == 1 and "a" in queue.dirty
        queue.done("a")
        assert queue.queued == {"a", "b"} and not queue.dirty

    asyncio.run(main())


def test_add_after_keeps_the_earliest_wake_up():
    async def main():
        loop = asyncio.get_running_loop()
        queue = WorkQueue()
        queue.add_after("k", 60)
        queue.add_after("k", 0.01)
        soon = queue.timers["k"].when()
        queue.add_after("k", 30)  # later than the one set: changes nothing
        assert queue.timers["k"].when() == soon <= loop.time() + 0.01
        assert await asyncio.wait_for(queue.get(), 10) == "k"
        assert not queue.timers and queue.queue.empty()

    asyncio.run(main())


class FakeClock:
    """A clock that only moves when slept on (or told to)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_token_bucket_gives_its_burst_at_once_then_its_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        bucket.take()
    assert not clock.slept  # the burst: no waiting
    start = clock.now
    for _ in range(20):
        bucket.take()
    assert clock.now - start == pytest.approx(2.0)  # 20 more at 10 a second
    assert all(s == pytest.approx(0.1) for s in clock.slept)


def test_a_token_bucket_never_saves_up_more_than_its_burst():
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock, sleep=clock.sleep)
    clock.now += 3600  # idle for an hour
    for _ in range(5):
        bucket.take()
    assert not clock.slept
    bucket.take()
    assert clock.slept == [pytest.approx(0.1)]


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


# -- the job cache's thread rule ------------------------------------------------------------


def obj(name: str, rv: int) -> dict:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": str(rv)}}


KEY = ("ns", "j")


def in_thread(fn):
    """fn() on a thread of its own: what it returned, or the exception it raised."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        out = thread.submit(fn)
        return out.exception(10) or out.result()


def test_the_watch_thread_writes_and_every_other_thread_only_reads():
    cache = JobCache(holder=lambda key: None)
    cache.put_job(KEY, obj("j", 1))  # the thread that made it: the event loop's
    cache.put_pod(KEY, obj("j-a1-w0", 1))
    for write in (
        lambda: cache.put_job(KEY, obj("j", 2)),
        lambda: cache.put_pod(KEY, obj("j-a1-w0", 2)),
        lambda: cache.drop_pod(KEY, "j-a1-w0"),
        lambda: cache.replace_pods(KEY, []),
        lambda: cache.forget(KEY),
    ):
        assert isinstance(in_thread(write), AssertionError)
    assert in_thread(lambda: list(cache.pods[KEY].values())) == [obj("j-a1-w0", 1)]
    assert cache.jobs[KEY] == obj("j", 1)
    with pytest.raises(TypeError):
        cache.jobs[KEY] = obj("j", 3)  # the views are read-only
    with pytest.raises(TypeError):
        cache.pods[KEY]["j-a1-w0"] = obj("j-a1-w0", 3)


def test_the_worker_holding_a_key_writes_that_job_only():
    held = {}
    cache = JobCache(holder=held.get)
    other = ("ns", "other")
    cache.put_job(KEY, obj("j", 1))
    cache.put_job(other, obj("other", 1))

    def as_holder():
        held[KEY] = threading.get_ident()
        cache.put_job(KEY, obj("j", 2))
        cache.put_pod(KEY, obj("j-a1-w0", 2))
        cache.put_job(other, obj("other", 2))  # not its key

    assert isinstance(in_thread(as_holder), AssertionError)
    assert cache.jobs[KEY] == obj("j", 2) and cache.pods[KEY]["j-a1-w0"] == obj("j-a1-w0", 2)
    assert cache.jobs[other] == obj("other", 1)


def test_the_queue_records_the_worker_holding_a_key():
    async def main():
        queue = WorkQueue()
        queue.add(KEY)
        await queue.get()
        assert queue.holder(KEY) is None  # taken, not yet on a thread

        def hold():
            with queue.holding(KEY):
                mine = queue.holder(KEY) == threading.get_ident()
                second = in_thread(lambda: queue.holding(KEY).__enter__())
            return mine, second

        mine, second = await asyncio.get_running_loop().run_in_executor(None, hold)
        assert mine and isinstance(second, AssertionError)  # one thread at a time
        assert queue.holder(KEY) is None
        queue.done(KEY)
        with pytest.raises(AssertionError):  # not taken from the queue
            queue.holding(KEY).__enter__()

    asyncio.run(main())


def test_only_objects_at_least_as_new_replace_cached_ones():
    cache = JobCache(holder=lambda key: None)
    cache.put_job(KEY, obj("j", 5))
    cache.put_job(KEY, obj("j", 4))
    assert cache.jobs[KEY] == obj("j", 5)
    cache.put_pod(KEY, obj("a", 7))
    cache.put_pod(KEY, obj("a", 6))
    assert cache.pods[KEY]["a"] == obj("a", 7)
    # a relist: listed pods replace older cached ones, a pod not listed goes, a newer
    # watched one stays
    cache.put_pod(KEY, obj("b", 3))
    cache.put_pod(KEY, obj("gone", 3))
    cache.replace_pods(KEY, [obj("a", 6), obj("b", 4)])
    assert dict(cache.pods[KEY]) == {"a": obj("a", 7), "b": obj("b", 4)}
    cache.drop_pod(KEY, "a")
    cache.drop_pod(KEY, "b")
    assert KEY not in cache.pods  # no empty entries


def test_the_cache_keeps_objects_without_managed_fields_or_kubectls_last_applied_copy():
    cache = JobCache(holder=lambda key: None)
    job = obj("j", 5)
    job["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    job["metadata"]["annotations"] = {LAST_APPLIED: '{"spec": {}}', "team": "nlp"}
    pod = obj("a", 7)
    pod["metadata"]["managedFields"] = [{"manager": "kwok", "fieldsV1": {"f:status": {}}}]
    cache.put_job(KEY, job)
    cache.put_pod(KEY, pod)
    cache.replace_pods(KEY, [pod])
    kept_job, kept_pod = cache.jobs[KEY], cache.pods[KEY]["a"]
    assert "managedFields" not in kept_job["metadata"] and "managedFields" not in kept_pod["metadata"]
    assert kept_job["metadata"]["annotations"] == {"team": "nlp"}
    assert kept_job["metadata"]["resourceVersion"] == "5" and kept_pod["metadata"]["name"] == "a"
    # the objects given are not changed (kopf and the watch may still hold them)
    assert "managedFields" in job["metadata"] and LAST_APPLIED in job["metadata"]["annotations"]
    assert slim(obj("b", 1)) == obj("b", 1)


def test_every_read_of_the_cache_is_a_fresh_copy_and_a_write_meanwhile_breaks_no_reader():
    cache = JobCache(holder=lambda key: None)
    cache.put_job(KEY, obj("j", 5))
    cache.put_pod(KEY, obj("a", 7))
    cache.jobs[KEY]["metadata"]["name"] = "changed"
    next(iter(cache.pods[KEY].values()))["metadata"]["name"] = "changed"
    assert cache.jobs[KEY] == obj("j", 5) and cache.pods[KEY]["a"] == obj("a", 7)
    assert cache.job_version(KEY) == 5 and cache.job_version(("ns", "other")) is None
    pods = cache.pods[KEY]
    items = iter(pods.items())
    cache.put_pod(KEY, obj("b", 8))  # while a reader iterates: it sees the snapshot it began with
    assert list(items) == [("a", obj("a", 7))]
    assert sorted(pods) == ["a", "b"] and len(pods) == 2 and "b" in pods


def test_jobs_in_a_phase_are_found_by_their_stored_phase():
    cache = JobCache(holder=lambda key: None)
    for name, phase in (("run", "Running"), ("done", "Succeeded"), ("new", None)):
        job = obj(name, 1)
        if phase:
            job["status"] = {"phase": phase}
        cache.put_job(("ns", name), job)
    assert cache.jobs_in_phase("Running") == [
        (("ns", "run"), {**obj("run", 1), "status": {"phase": "Running"}})
    ]
    cache.put_job(("ns", "run"), {**obj("run", 2), "status": {"phase": "Succeeded"}})
    assert sorted(k[1] for k, _ in cache.jobs_in_phase("Succeeded")) == ["done", "run"]
    assert cache.jobs_in_phase("Running") == []


def test_a_worker_does_not_bring_back_a_job_deleted_while_it_reconciled():
    held = {}
    cache = JobCache(holder=held.get)
    cache.put_job(KEY, obj("j", 1))
    cache.forget(KEY)  # the DELETED event, on the loop, mid-reconcile

    def after_its_writes():
        held[KEY] = threading.get_ident()
        cache.put_job(KEY, obj("j", 2))
        cache.put_pod(KEY, obj("j-a1-w0", 2))
        cache.replace_pods(KEY, [obj("j-a1-w1", 2)])

    assert in_thread(after_its_writes) is None
    assert KEY not in cache.jobs and KEY not in cache.pods


def test_the_controller_refuses_a_watch_event_off_its_event_loop():
    def pod() -> dict:
        return {
            "metadata": {
                "namespace": "ns",
                "name": "j-a1-w0",
                "resourceVersion": "1",
                "labels": {JOB_LABEL: "j"},
                "ownerReferences": [owner_reference("j", "u1")],
            },
            "spec": {},
            "status": {},
        }

    c = Controller(kube=None, workers=1)
    try:
        assert isinstance(in_thread(lambda: c.pod_event("ADDED", pod())), AssertionError)
        assert not c.pods
        c.pod_event("ADDED", pod())  # on the thread that made it
        assert list(c.pods[KEY]) == ["j-a1-w0"]
    finally:
        c.pool.shutdown()
        c.events.shutdown()
        c.requests.shutdown()


# -- list+watch ------------------------------------------------------------------------------


class ScriptedKube:
    """Answers each list with the next listing, each watch with the next list of events."""

    def __init__(self, listings: list[list[dict]], watches: list[list[dict]], stopping) -> None:
        self.listings, self.watches, self.stopping = listings, watches, stopping

    def call(self, method, path, query=None):
        items = self.listings.pop(0)
        if not self.listings:
            self.stopping.set()  # the last listing: the loop ends after its watch
        return {"items": items, "metadata": {"resourceVersion": "10"}}

    def stream(self, path, query):
        yield from self.watches.pop(0)


def test_a_relist_after_an_expired_watch_reports_what_vanished_meanwhile():
    def pod(name: str) -> dict:
        return {"metadata": {"namespace": "ns", "name": name, "labels": {JOB_LABEL: "j"}}}

    stopping = threading.Event()
    kube = ScriptedKube(
        listings=[[pod("a"), pod("b")], [pod("b"), pod("c")]],
        watches=[[{"type": "BOOKMARK", "object": {}}, {"type": "ERROR", "object": {}}], []],
        stopping=stopping,
    )
    seen = []
    watch_objects(kube, "/api/v1/pods", {}, lambda kind, o: seen.append((kind, o)), stopping, "pod")
    assert [(kind, o["metadata"]["name"]) for kind, o in seen] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "b"),
        ("ADDED", "c"),
        ("DELETED", "a"),  # gone while no watch ran: said, with its labels
    ]
    assert seen[4][1]["metadata"]["labels"] == {JOB_LABEL: "j"}


def test_a_watch_the_server_ends_is_resumed_from_the_last_version_without_a_list():
    """As client-go's reflector: a list in pages of LIST_PAGE, then watches, each from the
    last resourceVersion seen (a bookmark's too); only an expired one (ERROR) lists again."""

    def pod(name: str, rv: str) -> dict:
        return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": rv}}

    stopping = threading.Event()
    calls = []

    pages = [
        {"items": [pod("a", "3")], "metadata": {"resourceVersion": "10", "continue": "t1"}},
        {"items": [pod("b", "5")], "metadata": {"resourceVersion": "10"}},
        {"items": [pod("b", "5")], "metadata": {"resourceVersion": "40"}},
    ]
    watches = [
        [{"type": "MODIFIED", "object": pod("a", "11")}],  # ended by the server
        [{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}}],
        [{"type": "ERROR", "object": {"code": 410}}],  # expired
        [],
    ]

    class Paged:
        def call(self, method, path, query=None):
            calls.append(("list", query))
            return pages.pop(0)

        def stream(self, path, query):
            calls.append(("watch", query["resourceVersion"]))
            if len(watches) == 1:
                stopping.set()
            yield from watches.pop(0)

    seen = []
    watch_objects(
        Paged(),
        "/api/v1/pods",
        {},
        lambda kind, o: seen.append((kind, o["metadata"]["name"])),
        stopping,
        "pod",
    )
    assert calls == [
        ("list", {"limit": str(LIST_PAGE)}),
        ("list", {"limit": str(LIST_PAGE), "continue": "t1"}),
        ("watch", "10"),  # the list's version
        ("watch", "11"),  # after the last event
        ("watch", "20"),  # after the bookmark
        ("list", {"limit": str(LIST_PAGE)}),  # 410 Gone: list again
        ("watch", "40"),
    ]
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"), ("ADDED", "b"), ("DELETED", "a")]


def test_a_job_watch_lists_and_watches_the_namespace_or_the_cluster():
    paths = []

    class Recording(ScriptedKube):
        def call(self, method, path, query=None):
            paths.append(path)
            return super().call(method, path, query)

    for ns in ("team-a", None):
        stopping = threading.Event()
        kube = Recording(listings=[[]], watches=[[]], stopping=stopping)
        watch_collection(kube, "kubetune.dev", "v1alpha1", "finetunejobs", ns, lambda *_: None, stopping)
    assert paths == [
        "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs",
        "/apis/kubetune.dev/v1alpha1/finetunejobs",
    ]


def test_the_handoff_holds_at_most_its_limit_and_keeps_the_order():
    """Watch threads block while `limit` events wait for the loop; each arrives slim, in
    the order sent, and a blocked thread gives up when the operator stops."""

    async def main():
        loop = asyncio.get_running_loop()
        stopping = threading.Event()
        handoff = Handoff(loop, stopping, limit=3)
        applied = []
        sent = []

        def watch_thread():
            for i in range(10):
                obj = {"metadata": {"name": str(i), "managedFields": [{"manager": "kubectl"}]}}
                handoff(lambda kind, o: applied.append((kind, o)), "ADDED", obj)
                sent.append(i)

        t = threading.Thread(target=watch_thread)
        t.start()
        # the loop is held here (no await): the thread hands off 3, then waits for a slot
        wait_for(lambda: len(sent) == 3, 10, "three events handed off", interval_s=0.01)
        time.sleep(0.2)  # a negative: in this while, no fourth gets through
        assert len(sent) == 3 and applied == []
        await until(lambda: len(applied) == 10)
        assert [o["metadata"]["name"] for _, o in applied] == [str(i) for i in range(10)]
        assert all("managedFields" not in o["metadata"] for _, o in applied)
        t.join(5)

        # a thread waiting for a slot returns once stopping is set
        blocked = Handoff(loop, stopping, limit=1)
        blocked.slots.acquire()
        waiter = threading.Thread(target=blocked, args=(applied.append, "ADDED", {"metadata": {}}))
        waiter.start()
        stopping.set()
        await asyncio.to_thread(waiter.join, 5)
        assert not waiter.is_alive() and len(applied) == 10

    asyncio.run(main())


def test_the_allocator_hands_freed_heap_memory_back():
    """What Python frees stays in glibc's heap (the last block pins its top) until
    trim() hands it back. In a child process: this one's RSS is the test runner's."""
    script = """
import sys
from kubetune.runtime import Allocator

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

allocator = Allocator()
assert allocator.limit_arenas()
blocks = [bytes(100_000) + bytes([i % 256]) for i in range(1500)]  # under malloc's mmap threshold
blocks = blocks[-1:]  # the last one, at the heap's top, stays
held = rss_mib()
assert allocator.trim()
print(held, rss_mib())
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    held, trimmed = map(float, out.stdout.split())
    assert held - trimmed > 100, f"RSS {held:.0f} MiB before trim, {trimmed:.0f} after"
