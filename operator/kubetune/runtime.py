"""The controller runtime: what a client-go controller is built from (list+watch loops,
a work queue and its workers, a job cache with one rule for who writes it, resourceVersion
ordering, a token bucket, the progress poller and its backoff), without the reconcile itself."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import json
import logging
import threading
import time
from collections.abc import Mapping
from types import MappingProxyType

from kubetune.kube import Kube

log = logging.getLogger("kubetune")


def resource_version(obj: dict) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def slim(obj: dict) -> dict:
    """What a cache keeps of an object: all of it but metadata.managedFields and
    kubectl's last-applied annotation, which nothing here reads (client-go informers drop
    them with a transform; controller-runtime does by default). A pod's managed fields
    repeat the shape of its spec and status once per writer: at thousands of jobs they
    were most of the operator's memory. The object given is not changed."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if "managedFields" not in meta and LAST_APPLIED not in annotations:
        return obj
    kept = {k: v for k, v in meta.items() if k != "managedFields"}
    if LAST_APPLIED in annotations:
        kept["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return {**obj, "metadata": kept}


class Allocator:
    """The C allocator's side of the operator's memory (glibc; elsewhere each call does
    nothing). Python returns what it frees to malloc, and glibc keeps it: a busy hour at
    thousands of jobs left RSS at its peak long after the objects were gone (at 2,000
    jobs created, completed and deleted, the live Python objects were back under 4 MiB
    while RSS stayed 67 MiB over its start; malloc_trim gave 30 MiB of it back). So the
    operator keeps two malloc arenas (glibc makes up to 8 per core, one per busy thread,
    each keeping its own free memory) and hands free pages back every TRIM_S."""

    M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)
    ARENAS = 2
    TRIM_S = 30.0

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL(None)  # the process's own symbols: libc's, no library search
            self._mallopt, self._trim = libc.mallopt, libc.malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
            self._mallopt = self._trim = None

    def limit_arenas(self) -> bool:
        """Before any thread starts (arenas are made as threads first allocate)."""
        return bool(self._mallopt and self._mallopt(self.M_ARENA_MAX, self.ARENAS))

    def trim(self) -> bool:
        """Hand the free pages of every arena back to the kernel; True if any was."""
        return bool(self._trim and self._trim(0))

    def trim_every(self, stopping: threading.Event) -> None:
        """A thread's loop until stopping is set."""
        while not stopping.wait(self.TRIM_S):
            self.trim()


class TokenBucket:
    """Up to `burst` takes at once, then `rate` a second (clock and sleep replaceable for tests)."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic, sleep=time.sleep) -> None:
        self.rate, self.burst = rate, burst
        self.clock, self.sleep = clock, sleep
        self.tokens, self.stamp = float(burst), clock()

    def take(self) -> None:
        """Block until a token is free (one caller: the events thread)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            self.sleep((1 - self.tokens) / self.rate)
            self.tokens, self.stamp = 1.0, self.clock()
        self.tokens -= 1


class WorkQueue:
    """Like client-go's workqueue: a key is queued at most once, never processed by two
    workers at once, and re-queued if it changed while being processed. Used on the event
    loop, except `holding`, which the worker thread processing a key runs in."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queued: set = set()
        self.active: dict = {}  # key being processed -> the thread holding it (None: none yet)
        self.dirty: set = set()
        self.timers: dict = {}

    def add(self, key) -> None:
        if key in self.active:
            self.dirty.add(key)
        elif key not in self.queued:
            self.queued.add(key)
            self.queue.put_nowait(key)

    def add_after(self, key, delay: float) -> None:
        loop = asyncio.get_running_loop()
        old = self.timers.get(key)
        when = loop.time() + delay
        if old and old.when() <= when:
            return  # an earlier wake-up is already set
        if old:
            old.cancel()
        self.timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key) -> None:
        self.timers.pop(key, None)
        self.add(key)

    async def get(self):
        key = await self.queue.get()
        self.queued.discard(key)
        self.active[key] = None
        return key

    @contextlib.contextmanager
    def holding(self, key):
        """The calling thread processes key (taken with get, not yet done): the JobCache
        lets it, and only it, write key's entries meanwhile."""
        if self.active.get(key, False) is not None:
            raise AssertionError(f"{key} is not taken from the queue, or another thread holds it")
        me = self.active[key] = threading.get_ident()
        try:
            yield
        finally:
            if self.active.get(key) == me:  # (not after done: a worker cancelled at shutdown)
                self.active[key] = None

    def holder(self, key) -> int | None:
        """The thread processing key now, if any."""
        return self.active.get(key)

    def done(self, key) -> None:
        self.active.pop(key, None)
        if key in self.dirty:
            self.dirty.discard(key)
            self.add(key)


async def worker(queue: WorkQueue, pool: concurrent.futures.Executor, reconcile, retry_s: float) -> None:
    """client-go's processNextWorkItem, forever: take a key, reconcile it on a pool thread
    (which holds the key meanwhile), mark it done, and queue it again after the delay the
    reconcile returned (None: not again) or, when it raised, after retry_s."""
    loop = asyncio.get_running_loop()

    def held(key):
        with queue.holding(key):
            return reconcile(key)

    while True:
        key = await queue.get()
        try:
            requeue = await loop.run_in_executor(pool, held, key)
        except Exception as e:
            log.warning("reconcile %s/%s failed, retrying in %.0f s: %s", *key, retry_s, e)
            requeue = retry_s
        finally:
            queue.done(key)
        if requeue is not None:
            queue.add_after(key, requeue)


class Stored:
    """An object as a cache keeps it: its resourceVersion, and the object slim() as
    compact JSON, decoded afresh on every read. A parsed pod is ~28 KiB of Python dicts
    and strings, its JSON 5 KiB (a job 12 against 2): at 5,000 jobs the parsed form alone
    was 200 MiB. A read costs tens of microseconds, and hands out a copy nobody shares."""

    __slots__ = ("data", "phase", "rv")

    def __init__(self, obj: dict) -> None:
        self.rv = resource_version(obj)
        self.phase = (obj.get("status") or {}).get("phase")  # read without a decode
        self.data = json.dumps(slim(obj), separators=(",", ":")).encode()

    def value(self) -> dict:
        return json.loads(self.data)


class DecodedView(Mapping):
    """A read-only mapping over Stored objects: each read decodes a fresh copy. Iteration
    and values()/items() work on a snapshot, so another thread's write meanwhile never
    breaks a reader (it sees the objects as they were when it started)."""

    def __init__(self, store: dict) -> None:
        self._store = store

    def __getitem__(self, key) -> dict:
        return self._store[key].value()

    def __contains__(self, key) -> bool:
        return key in self._store

    def __iter__(self):
        return iter(list(self._store))

    def __len__(self) -> int:
        return len(self._store)

    def items(self):
        return [(k, v.value()) for k, v in list(self._store.items())]

    def values(self):
        return [v.value() for v in list(self._store.values())]


def newer_or_same(new: dict, old: Stored | None) -> bool:
    return old is None or resource_version(new) >= old.rv


class JobCache:
    """The cached FineTuneJobs and their pods, by job key. The rule for threads: a job's
    entries are written only (a) by the watch thread, the event loop's, which made the
    cache, on watch events, or (b) by the one worker thread holding the job's key in the
    WorkQueue (there is at most one), after its own writes to the API server, and only while
    the job is cached (a job deleted meanwhile is not brought back). Objects are only ever
    replaced by ones at least as new (resourceVersion), and kept as Stored (slim, encoded):
    every read returns a fresh copy. Every other thread only reads: `jobs` and `pods` are
    read-only views. A write from any other thread raises AssertionError."""

    def __init__(self, holder) -> None:
        self.holder = holder  # key -> the thread holding it in the WorkQueue (WorkQueue.holder)
        self.watch_thread = threading.get_ident()
        self._jobs: dict[tuple[str, str], Stored] = {}
        self._pods: dict[tuple[str, str], dict[str, Stored]] = {}
        self._pod_views: dict[tuple[str, str], DecodedView] = {}
        self.jobs = DecodedView(self._jobs)
        self.pods = MappingProxyType(self._pod_views)  # key -> read-only {pod name: pod}
        # a worker's check that the job is still cached and its write are one step: the
        # watch thread cannot forget the job in between
        self._lock = threading.Lock()

    def job_version(self, key) -> int | None:
        """The cached job's resourceVersion (None: not cached), without decoding it."""
        stored = self._jobs.get(key)
        return None if stored is None else stored.rv

    def jobs_in_phase(self, phase: str) -> list[tuple[tuple[str, str], dict]]:
        """(key, job) of the cached jobs whose status.phase is `phase`, decoding only those
        (the progress poll looks at the Running ones of thousands, every interval)."""
        return [(k, v.value()) for k, v in list(self._jobs.items()) if v.phase == phase]

    def _may_write(self, key) -> bool:
        """True on the watch thread; on the worker holding key, whether the job is still
        cached; AssertionError on any other thread."""
        me = threading.get_ident()
        if me == self.watch_thread:
            return True
        if self.holder(key) != me:
            raise AssertionError(
                f"thread {threading.current_thread().name} wrote the cache of {key} without holding the key"
            )
        return key in self._jobs

    def put_job(self, key, job: dict) -> None:
        with self._lock:
            if self._may_write(key) and newer_or_same(job, self._jobs.get(key)):
                self._jobs[key] = Stored(job)

    def put_pod(self, key, pod: dict) -> None:
        name = pod["metadata"]["name"]
        with self._lock:
            if not self._may_write(key):
                return
            pods = self._pods.get(key)
            if pods is None:
                pods = self._pods[key] = {}
                self._pod_views[key] = DecodedView(pods)
            if newer_or_same(pod, pods.get(name)):
                pods[name] = Stored(pod)

    def drop_pod(self, key, name: str) -> None:
        with self._lock:
            if not self._may_write(key):
                return
            pods = self._pods.get(key)
            if pods is not None:
                pods.pop(name, None)
                if not pods:
                    self._forget_pods(key)

    def replace_pods(self, key, pods: list[dict]) -> None:
        """The job's pods as listed: a pod not listed is dropped; a listed one replaces the
        cached one unless a watch event brought a newer one meanwhile."""
        with self._lock:
            if not self._may_write(key):
                return
            cached = self._pods.get(key) or {}
            fresh = {}
            for pod in pods:
                name = pod["metadata"]["name"]
                old = cached.get(name)
                fresh[name] = Stored(pod) if newer_or_same(pod, old) else old
            self._forget_pods(key)
            if fresh:
                self._pods[key] = fresh
                self._pod_views[key] = DecodedView(fresh)

    def forget(self, key) -> None:
        """The job is deleted: nothing of it stays."""
        with self._lock:
            self._may_write(key)
            self._jobs.pop(key, None)
            self._forget_pods(key)

    def _forget_pods(self, key) -> None:
        self._pods.pop(key, None)
        self._pod_views.pop(key, None)


class ProgressPoller:
    """One round of progress requests per tick, never waited for: each request runs on a
    fetcher thread under its own total deadline, a pod whose request is still in flight is
    skipped this round, and an unanswered pod is asked less often (PollBackoff). One slow
    or silent trainer thus costs a fetcher for a couple of seconds now and then; it never
    holds up another job's progress."""

    def __init__(self, interval_s: float, fetch, changed, fetchers: int = 16, answered=None) -> None:
        self.fetch, self.changed = fetch, changed
        self.answered = answered or (lambda name, body, now: None)
        self.backoff = PollBackoff(interval_s)
        self.pool = concurrent.futures.ThreadPoolExecutor(fetchers, thread_name_prefix="progress")
        self.in_flight: dict[str, concurrent.futures.Future] = {}

    def tick(self, targets: list[tuple], now: float) -> list:
        """Start a request for each (key, pod, address) that is due and not already asked
        (a pod: any id, (namespace, name) in the operator); returns the pods asked."""
        for name in [n for n, f in self.in_flight.items() if f.done()]:
            del self.in_flight[name]
        self.backoff.keep({name for _, name, _ in targets})
        asked = []
        for key, name, address in targets:
            if name in self.in_flight or not self.backoff.due(name, now):
                continue
            self.in_flight[name] = self.pool.submit(self._ask, key, name, address)
            asked.append(name)
        return asked

    def _ask(self, key, name: str, address: str) -> None:
        body = self.fetch(address)
        now = time.monotonic()
        self.backoff.record(name, body is not None, now)
        self.answered(name, body, now)
        if body is not None:
            self.changed(key, name, body)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class PollBackoff:
    """When to ask a trainer for its progress again: every interval while it answers,
    and after each unanswered ask twice as long as before, up to a minute. A trainer
    still loading its model, or a pod the operator cannot reach (a NetworkPolicy),
    then costs a request a minute instead of one per interval; at 500 running jobs the
    unanswered requests were 13% of the operator's CPU."""

    MAX_S = 60.0

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.unanswered: dict[str, tuple[int, float]] = {}  # pod -> (asks in a row, next ask)

    def due(self, pod: str, now: float) -> bool:
        return now >= self.unanswered.get(pod, (0, 0.0))[1]

    def record(self, pod: str, answered: bool, now: float) -> None:
        if answered:
            self.unanswered.pop(pod, None)
            return
        misses = self.unanswered.get(pod, (0, 0.0))[0] + 1
        wait = min(self.interval_s * 2**misses, max(self.MAX_S, self.interval_s))
        self.unanswered[pod] = (misses, now + wait)

    def keep(self, pods: set[str]) -> None:
        """Forget pods that are no longer polled (finished, replaced)."""
        for pod in set(self.unanswered) - pods:
            del self.unanswered[pod]


class Handoff:
    """How the watch threads hand their events to the event loop, which alone applies them
    to the cache: at most `limit` wait there at once. Past that a watch thread blocks, and
    the API server holds the rest of its stream: unbounded, a mass deletion queued every
    deleted object's last state at once, faster than the loop applied them. Each object
    is slim() on the watch thread, so what waits is small."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stopping: threading.Event, limit: int = 256) -> None:
        self.loop, self.stopping = loop, stopping
        self.slots = threading.BoundedSemaphore(limit)

    def __call__(self, apply, kind: str, obj: dict) -> None:
        """On a watch thread: queue apply(kind, obj) for the loop, waiting for a slot."""
        while not self.slots.acquire(timeout=1.0):
            if self.stopping.is_set():
                return
        try:
            self.loop.call_soon_threadsafe(self._apply, apply, kind, slim(obj))
        except RuntimeError:  # the loop is closed: the operator is stopping
            self.slots.release()

    def _apply(self, apply, kind: str, obj: dict) -> None:
        self.slots.release()
        apply(kind, obj)


def watch_pods(kube: Kube, namespace: str | None, label_selector: str, emit, stopping) -> None:
    """List, then watch, the pods matching label_selector, calling emit(type, pod) for
    each change, forever (until stopping is set). Raw JSON lines, no model objects: the
    operator sees every event of every trainer pod, so this path must be cheap. A
    relist after an expired watch emits DELETED for pods that vanished meanwhile."""
    base = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
    watch_objects(kube, base, {"labelSelector": label_selector}, emit, stopping, "pod")


def watch_collection(
    kube: Kube, group: str, version: str, plural: str, namespace: str | None, emit, stopping
) -> None:
    """A custom resource's objects, as watch_pods watches pods."""
    where = f"namespaces/{namespace}/" if namespace else ""
    watch_objects(kube, f"/apis/{group}/{version}/{where}{plural}", {}, emit, stopping, plural)


def watch_nodes(kube: Kube, emit, stopping) -> None:
    """The nodes, as watch_pods watches pods (for termination notices)."""
    watch_objects(kube, "/api/v1/nodes", {}, emit, stopping, "node")


LIST_PAGE = 500  # objects per page of a list (client-go's reflector asks for pages of 500)


def watch_objects(kube: Kube, base: str, query: dict, emit, stopping, what: str) -> None:
    """client-go's reflector, on raw JSON: list (in pages), then watch from the list's
    resourceVersion; a watch the server ends (timeoutSeconds) or a dropped connection is
    watched again from the last resourceVersion seen (bookmarks keep it fresh), and only
    an expired one (410 Gone) is listed again. A relist of every pod every few minutes
    was the operator's largest allocation at thousands of jobs, and needless API load."""
    known: dict[tuple[str, str], dict] = {}  # object -> its labels
    rv: str | None = None  # where the next watch starts; None: list first

    def key_of(obj: dict) -> tuple[str, str]:
        return (obj["metadata"].get("namespace") or "", obj["metadata"]["name"])

    while not stopping.is_set():
        try:
            if rv is None:
                rv, known = relist(kube, base, query, emit, known, key_of)
            for event in kube.stream(
                base,
                {
                    **query,
                    "watch": "1",
                    "resourceVersion": rv,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "300",
                },
            ):
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    rv = None  # 410 Gone: the resourceVersion expired; list again
                    break
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    known.pop(key_of(obj), None)
                else:
                    known[key_of(obj)] = obj["metadata"].get("labels") or {}
                emit(kind, obj)
        except Exception as e:  # dropped connection, API server restart: watch again
            if getattr(e, "status", None) == 410:
                rv = None
            log.warning("%s watch restarting: %s", what, e)
            stopping.wait(1.0)


def relist(kube: Kube, base: str, query: dict, emit, known: dict, key_of) -> tuple[str, dict]:
    """List in pages, emitting ADDED for each object as its page arrives, then DELETED
    (with its labels) for each known object the list no longer holds: what vanished while
    no watch ran. Returns the list's resourceVersion and the objects' labels now."""
    current: dict[tuple[str, str], dict] = {}
    page_query = {**query, "limit": str(LIST_PAGE)}
    list_rv = None
    while True:
        page = kube.call("GET", base, query=dict(page_query))
        list_rv = list_rv or page["metadata"]["resourceVersion"]  # every page is of one snapshot
        for obj in page["items"]:
            current[key_of(obj)] = obj["metadata"].get("labels") or {}
            emit("ADDED", obj)
        token = (page["metadata"] or {}).get("continue")
        if not token:
            break
        page_query["continue"] = token
    for key in set(known) - set(current):
        meta = {"name": key[1], "labels": known[key], **({"namespace": key[0]} if key[0] else {})}
        emit("DELETED", {"metadata": meta})
    return list_rv, current
