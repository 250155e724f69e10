"""The operator: kopf watches FineTuneJobs, a plain watch follows their pods, and both
feed a deduplicating work queue; a reconcile reads the cached job and pods, asks status.decide() what to do and
applies the plan: create (idempotent), delete, one status patch, then events."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import logging
import os
import secrets
import socket
import threading
import time

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubetune import metrics
from kubetune.api import ADAPTER_KIND, GROUP, PLURAL, VERSION, FineTuneJobSpec
from kubetune.gang import capacity_scope, gang_fit, gated, without_gang_gate
from kubetune.kube import Kube, watch_nodes, watch_pods
from kubetune.kueue import PRIORITY_BOOST_ANNOTATION
from kubetune.library import adapter_names, adapter_object, resolve_init_from, same_registration
from kubetune.manifests import (
    JOB_LABEL,
    PROGRESS_PORT,
    build_network_policy,
    build_service,
    control_token,
    controller_uid,
    with_control_token,
)
from kubetune.notices import Notice, notice, pods_on
from kubetune.policy import Policy, violations
from kubetune.stall import RankWatch, Stall, find_stall
from kubetune.status import (
    GONE,
    after_refusal,
    decide,
    finite,
    iso,
    merge_patch,
    needs_init_from,
    pod_attempt,
    pod_rank,
)

log = logging.getLogger("kubetune")
NETWORK_POLICY_ENV = "KUBETUNE_NETWORK_POLICY"  # {"namespace": ..., "podLabels": {...}}
RESYNC_S = 30.0  # a running job is looked at again at least this often
RETRY_S = 2.0
BOOST_RETRY_S = 5.0  # a Kueue Workload not found yet (Kueue makes it just after the pods)
# Pod changes come in bursts (bound, started, ready): look once they settled, so one
# status write covers them. New jobs and spec changes are looked at at once.
POD_SETTLE_S = 0.5
EVENTS_PER_S, EVENT_BURST = 10.0, 25


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> None:
        """Block until a token is free (one caller: the events thread)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            time.sleep((1 - self.tokens) / self.rate)
            self.tokens, self.stamp = 1.0, time.monotonic()
        self.tokens -= 1


def _rv(obj: dict) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


def _newer(new: dict, old: dict | None) -> bool:
    return old is None or _rv(new) >= _rv(old)


class WorkQueue:
    """Like client-go's workqueue: a key is queued at most once, never processed by two
    workers at once, and re-queued if it changed while being processed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queued: set = set()
        self.active: set = set()
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
        self.active.add(key)
        return key

    def done(self, key) -> None:
        self.active.discard(key)
        if key in self.dirty:
            self.dirty.discard(key)
            self.add(key)


class Controller:
    def __init__(self, kube: Kube, workers: int = 8) -> None:
        self.kube = kube
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict[str, dict]] = {}
        self.queue = WorkQueue()
        self.workers = workers
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")
        # one thread: events never compete with reconciles for the API server
        self.events = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")
        self.event_bucket = TokenBucket(rate=EVENTS_PER_S, burst=EVENT_BURST)
        self.first_seen: dict[tuple[str, str], float] = {}
        self.task: asyncio.Task | None = None
        # (pod name, GET /progress body) of each running job's rank 0, polled
        self.progress: dict[tuple[str, str], tuple[str, dict]] = {}
        # one gang is checked and released at a time: two must not share free capacity
        self.gang_lock = threading.Lock()
        self.stalls: dict[tuple[str, str], Stall] = {}  # running jobs whose trainer is stuck
        self.refusals: dict[tuple[str, str], Refusal] = {}  # jobs whose last create was refused
        # the priority boost last set on each queued job's Kueue Workload ((name, value),
        # and when to try again if that Workload was not there yet)
        self.boosts: dict[tuple[str, str], tuple[tuple[str, int], float | None]] = {}
        self.policy = Policy.from_env()  # what podOverrides may set (the chart's policy values)
        # where the operator runs, for each job's NetworkPolicy (unset: none is made)
        self.network_policy = json.loads(os.environ.get(NETWORK_POLICY_ENV) or "null")
        # whose pods the gang check counts: None, the cluster's; else these namespaces' only
        self.capacity_namespaces = capacity_scope()
        # nodes under a termination notice (kubetune.notices), and the checkpoint requests
        # sent to the trainers on them (a thread of their own: a slow pod holds up nothing)
        self.notices: dict[str, Notice] = {}
        self.asked: set[tuple] = set()  # (job key, node, attempt) asked for a checkpoint
        self.trainer_port = PROGRESS_PORT
        self.requests = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="checkpoint-request")
        self.starting: set[tuple] = set()  # (job key, pod) a POST /start is in flight for

    # -- watch side (event loop) ----------------------------------------------------------

    def job_event(self, kind: str, body: dict) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if kind == "DELETED":
            self.jobs.pop(key, None)
            self.pods.pop(key, None)
            self.progress.pop(key, None)
            self.stalls.pop(key, None)
            self.first_seen.pop(key, None)
            self.refusals.pop(key, None)
            self.boosts.pop(key, None)
            self.starting = {s for s in self.starting if s[0] != key}
            self.asked = {a for a in self.asked if a[0] != key}
            metrics.forget_job(key)
            return
        old = self.jobs.get(key)
        if old is not None and _rv(body) == _rv(old):
            return  # the echo of our own status write: nothing new
        if _newer(body, old):
            self.jobs[key] = body
        if not (body.get("status") or {}).get("attempt"):
            self.first_seen.setdefault(key, time.monotonic())  # a new job: time it to its pods
        self.queue.add(key)

    def pod_event(self, kind: str, body: dict) -> None:
        meta = body["metadata"]
        job = (meta.get("labels") or {}).get(JOB_LABEL)
        if not job:
            return
        key = (meta["namespace"], job)
        pods = self.pods.setdefault(key, {})
        cached = pods.get(meta["name"])
        if kind == "DELETED" and cached is not None and cached["metadata"].get("uid") != meta.get("uid"):
            # an earlier pod of this name (a standby deleted and made again): the cached
            # one is its successor and stays
            pass
        elif kind == "DELETED" and terminated_container(body) and key in self.jobs and controller_uid(body):
            # kept as its last state: an evicted trainer's exit code and termination message
            # (its checkpoint) must reach the reconcile even though the pod object is gone
            pods[meta["name"]] = {**body, GONE: True}
        elif kind == "DELETED" or controller_uid(body) is None:
            # gone, or its job is (a deleted job's pods go after it: the garbage collector
            # deletes them once the job is gone), or not made by a FineTuneJob whatever its
            # labels say: nothing of it is kept
            pods.pop(meta["name"], None)
        elif _newer(body, pods.get(meta["name"])):
            pods[meta["name"]] = body
        if not pods:
            del self.pods[key]
        if key in self.jobs:
            self.queue.add_after(key, POD_SETTLE_S)
            self._ask_if_noticed(key)

    def node_event(self, kind: str, node: dict) -> None:
        """A node's termination notice appeared: every job with a worker of its current
        attempt there is asked for a checkpoint now, so that the SIGTERM that follows finds
        its work saved. A notice withdrawn is forgotten (the checkpoint taken meanwhile
        costs a few seconds and changes nothing). Nodes under notice are kept out of new
        attempts' placement."""
        name = node["metadata"]["name"]
        found = None if kind == "DELETED" else notice(node)
        old = self.notices.get(name)
        if found is None:
            if old is not None:
                del self.notices[name]
                self.asked = {a for a in self.asked if a[1] != name}
                log.info("node %s: %s withdrawn", name, old.what)
                self._reconcile_jobs_on(name)  # a standby started for it goes
            return
        self.notices[name] = found
        if old is not None:
            return  # already acted on
        log.warning("%s", found.reason)
        metrics.count_notice(found.source)
        for key in list(self.pods):
            self._ask_if_noticed(key)
        self._reconcile_jobs_on(name)  # a single-worker job's standby starts now

    def _reconcile_jobs_on(self, node: str) -> None:
        for key, pods in list(self.pods.items()):
            if pods_on(node, list(pods.values())):
                self.queue.add(key)

    def _ask_if_noticed(self, key) -> None:
        """Ask the job's rank 0 for a checkpoint, once per attempt and node, if a worker of
        its current attempt runs on a node under notice. Called on a notice and on every
        pod change: a notice seen before the pods (an operator restart lists the nodes
        first) or before rank 0 had an address is acted on when they show up."""
        job = self.jobs.get(key)
        if (
            not self.notices
            or job is None
            or (job.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        ):
            return
        attempt = (job.get("status") or {}).get("attempt")
        owned = self._owned(job, list(self.pods.get(key, {}).values()))
        rank0 = next((p for p in running_workers(owned, attempt) if pod_rank(p) == 0), None)
        if rank0 is None:
            return  # not training yet: nothing to save
        for name, found in list(self.notices.items()):
            there = [p["metadata"]["name"] for p in pods_on(name, owned) if pod_attempt(p) == attempt]
            if there and (key, name, attempt) not in self.asked:
                self.asked.add((key, name, attempt))
                self.requests.submit(self._ask_checkpoint, job, rank0, found, there)

    def avoided_nodes(self) -> tuple[str, ...]:
        """The nodes under a notice the scheduler does not see: a condition (AKS), not a
        NoSchedule taint, which it heeds itself and which is lifted with the notice (a pod
        kept off a node by affinity would stay off it when its capacity comes back)."""
        return tuple(sorted(n for n, found in list(self.notices.items()) if not found.taint))

    def _ask_checkpoint(self, job: dict, rank0: dict, found: Notice, there: list[str]) -> None:
        pod = rank0["metadata"]["name"]
        answer = request_checkpoint(
            rank0["status"]["podIP"], control_token(rank0), found.reason, port=self.trainer_port
        )
        stamp = iso(dt.datetime.now(dt.timezone.utc))
        workers = ", ".join(there)
        if answer is None:
            message = f"{found.reason}: the checkpoint request to {pod} failed; its workers there: {workers}"
            log.warning("%s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], message)
            self.events.submit(self._event, job, "Warning", "CheckpointRequestFailed", message, stamp)
            return
        message = (
            f"{found.reason}: checkpoint requested of {pod} at step {answer.get('step')}"
            + (" (one was already under way)" if answer.get("coalesced") else "")
            + f"; its workers there: {workers}"
        )
        log.info("%s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], message)
        metrics.count_checkpoint_request()
        self.events.submit(self._event, job, "Normal", "CheckpointRequested", message, stamp)

    async def run_workers(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self.queue.get()
            try:
                requeue = await loop.run_in_executor(self.pool, self.reconcile, key)
            except Exception as e:
                log.warning("reconcile %s/%s failed, retrying in %.0f s: %s", *key, RETRY_S, e)
                requeue = RETRY_S
            finally:
                self.queue.done(key)
            if requeue is not None:
                self.queue.add_after(key, requeue)

    # -- reconcile (worker threads) -------------------------------------------------------

    def reconcile(self, key: tuple[str, str]) -> float | None:
        self.kube.fence()  # a replica that lost its leader Lease does not even decide
        job = self.jobs.get(key)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return None
        refused = self.refusals.get(key)
        if refused and refused.generation == job["metadata"].get("generation"):
            wait = refused.not_before - time.monotonic()
            if wait > 0:
                return wait  # backing off after a refused create (a spec change retries at once)
        t0 = time.perf_counter()
        now = dt.datetime.now(dt.timezone.utc)
        pods = self._owned(job, list(self.pods.get(key, {}).values()))
        progress = self.progress.get(key)
        attempt = (job.get("status") or {}).get("attempt")
        waiting = [p for p in pods if gated(p) and pod_attempt(p) == attempt]
        with self.gang_lock if waiting else contextlib.nullcontext():
            gang = None
            if waiting:
                # the scheduler's view, read fresh: nodes and the pods holding their capacity
                # (with gang.capacityView: namespaces, only the watched namespaces' pods)
                scope = self.capacity_namespaces
                held = self.kube.list_active_pods_in(scope) if scope else self.kube.list_active_pods()
                gang = gang_fit(waiting[0], len(waiting), self.kube.list_nodes(), held)
            problems = violations(job.get("spec") or {}, self.policy)
            stall = self.stalls.get(key)
            avoid, noticed = self.avoided_nodes(), tuple(sorted(self.notices))
            init_from = self._resolve_init_from(key, job)

            def decide_on(pods: list[dict]):
                return decide(
                    job,
                    pods,
                    now,
                    problems,
                    progress=progress,
                    gang=gang,
                    stall=stall,
                    avoid_nodes=avoid,
                    noticed=noticed,
                    init_from=init_from,
                )

            plan = decide_on(pods)
            if any(loss.reason == "PodDeleted" for loss in plan.losses):
                # a pod missing from the cache may only be not seen yet: ask the API server
                pods = self._owned(job, self.kube.list_pods(key[0], f"{JOB_LABEL}={key[1]}"))
                if key in self.jobs:  # (not brought back for a job deleted meanwhile)
                    self.pods[key] = {p["metadata"]["name"]: p for p in pods}
                plan = decide_on(pods)
            for name in plan.ungate:
                gates = without_gang_gate(self.pods[key][name]) or None
                released = self.kube.patch_pod(key[0], name, {"spec": {"schedulingGates": gates}})
                if _newer(released, self.pods[key].get(name)):
                    self.pods[key][name] = released
        try:
            self._apply(key, job, plan, now)
        except Refused as r:
            return self._refused(key, job, plan, r, now)
        except NameBusy as b:
            log.info("%s/%s: %s; trying again in %.0f s", *key, b, RETRY_S)
            return RETRY_S
        try:
            self._after_apply(key, job, plan, now)
            self._boost(key, plan.workload_boost)
            self._start_standby(key, plan.start)
            log.debug(
                "reconciled %s/%s: attempt %s, %d pod(s) seen, phase %s, create %d, delete %d",
                *key,
                plan.status.get("attempt"),
                len(pods),
                plan.status.get("phase"),
                len(plan.create),
                len(plan.delete),
            )
        except ApiException as e:
            if e.status != 409:
                raise
            # the job changed under us: decide again on the current object
            fresh = self.kube.get_job(*key)
            if fresh is not None:
                self.jobs[key] = fresh
            return 0.05
        metrics.observe_reconcile(time.perf_counter() - t0)
        return plan.requeue_after if plan.requeue_after is not None else self._resync(plan)

    def _resolve_init_from(self, key, job: dict) -> dict | str | None:
        """spec.lora.initFrom.adapter looked up, while the job has not pinned it yet."""
        name = needs_init_from(job)
        if name is None:
            return None
        try:
            spec = FineTuneJobSpec.model_validate(job["spec"])
        except ValidationError:
            return None  # decide() fails the job with the validation's message
        try:
            adapter = self.kube.get(key[0], ADAPTER_KIND, name)
        except ApiException as e:
            if e.status not in (403, 404):
                raise
            return f"spec.lora.initFrom.adapter: Adapter {name} cannot be read: {api_message(e)}"
        return resolve_init_from(spec, adapter, key[0])

    def _register_adapter(self, key, job: dict, record: dict) -> str | None:
        """Create the job's Adapter object (not owned by the job); its name, or None when
        the library cannot be written (no CRD, no permission): the job succeeds anyway,
        with a Warning Event saying why."""
        ns, uid = key[0], job["metadata"]["uid"]
        for name in adapter_names(key[1], uid):
            try:
                if self.kube.create(ns, adapter_object(name, ns, record)) is not None:
                    log.info("%s/%s: adapter registered as Adapter %s", *key, name)
                    return name
                found = self.kube.get(ns, ADAPTER_KIND, name)
            except ApiException as e:
                if e.status not in (403, 404, 422):
                    raise
                return self._not_registered(key, job, api_message(e))
            if found is not None and same_registration(found, record):
                return name  # registered by an earlier reconcile of this success
        return self._not_registered(
            key,
            job,
            f"Adapters named {' and '.join(adapter_names(key[1], uid))} hold other adapters; "
            f"`kubetune adapters import {record['adapter']['uri']}` registers it under another name",
        )

    def _not_registered(self, key, job: dict, why: str) -> None:
        """The job succeeds without its Adapter: said in the log and a Warning Event."""
        message = f"the adapter was not registered in the library: {why}"
        log.warning("%s/%s: %s", *key, message)
        stamp = iso(dt.datetime.now(dt.timezone.utc))
        self.events.submit(self._event, job, "Warning", "AdapterNotRegistered", message, stamp)

    def _start_standby(self, key, names: list[str]) -> None:
        """POST /start to standby trainers whose attempt's turn has come (one request in
        flight per pod; the next progress poll asks again if it did not get through)."""
        for name in names:
            pod = self.pods.get(key, {}).get(name)
            address = ((pod or {}).get("status") or {}).get("podIP")
            if pod is None or not address or (key, name) in self.starting:
                continue
            self.starting.add((key, name))
            self.requests.submit(self._send_start, key, pod, address)

    def _send_start(self, key, pod: dict, address: str) -> None:
        name = pod["metadata"]["name"]
        try:
            answer = control_request(address, control_token(pod), "/start", {}, port=self.trainer_port)
            if answer is not None and not answer.get("again"):
                log.info("%s/%s: standby %s told to start", *key, name)
        finally:
            self.starting.discard((key, name))

    def _boost(self, key, boost: tuple[str, int] | None) -> None:
        """Set the running pod group's priority boost on its Kueue Workload, when it moved."""
        if boost is None:
            return
        last, retry_at = self.boosts.get(key, (None, None))
        if last == boost and (retry_at is None or time.monotonic() < retry_at):
            return
        workload, value = boost
        patch = {"metadata": {"annotations": {PRIORITY_BOOST_ANNOTATION: str(value)}}}
        try:
            self.kube.patch_workload(key[0], workload, patch)
        except ApiException as e:
            if e.status == 404:  # Kueue has not made it yet (or is not installed)
                self.boosts[key] = (boost, time.monotonic() + BOOST_RETRY_S)
                return
            if e.status != 403:
                raise
            log.warning("%s/%s: may not patch Kueue Workload %s: %s", *key, workload, api_message(e))
        self.boosts[key] = (boost, None)

    @staticmethod
    def _owned(job: dict, pods) -> list[dict]:
        """The pods this job made: the same labels on a pod of an earlier job of the same
        name, or on a pod anyone else made, count for nothing."""
        uid = job["metadata"]["uid"]
        return [p for p in pods if controller_uid(p) == uid]

    @staticmethod
    def _resync(plan) -> float | None:
        return RESYNC_S if plan.status.get("phase") not in ("Succeeded", "Failed", "Suspended") else None

    def _apply(self, key, job: dict, plan, now: dt.datetime) -> None:
        """Create the new attempt's Service and pods; Refused when the API server turns one
        down for a reason a retry right away would not change."""
        ns, name = key
        uid = job["metadata"]["uid"]
        objects = [build_service(name, uid)] if job["spec"].get("workers", 1) > 1 else []
        if self.network_policy:
            objects.insert(0, build_network_policy(name, uid, self.network_policy))
        try:
            for obj in objects + plan.create if plan.create else []:
                if obj["kind"] == "Pod":
                    # the bearer token its trainer takes checkpoint requests with (random,
                    # so not in the pure plan)
                    with_control_token(obj, secrets.token_urlsafe(24))
                created = self.kube.create(ns, obj)
                if created is None:
                    created = self._existing(ns, obj, uid)
                if created["kind"] == "Pod":
                    cached = self.pods.setdefault(key, {})
                    # not over a newer state the pod watch brought meanwhile (a pod another
                    # replica made, found Running by the watch before this GET's answer landed)
                    if _newer(created, cached.get(created["metadata"]["name"])):
                        cached[created["metadata"]["name"]] = created
        except ApiException as e:
            if e.status in (400, 403, 404, 422):
                raise Refused(e.status, api_message(e)) from e
            raise  # 429, 5xx, a conflict: the usual retry
        if plan.create:
            self.refusals.pop(key, None)
            if key in self.first_seen:
                metrics.observe_pods_created(time.monotonic() - self.first_seen.pop(key))

    def _existing(self, ns: str, obj: dict, uid: str) -> dict:
        """The object already holding obj's name (its create found it there): ours from an
        earlier reconcile, or Refused when someone else's squats the name."""
        name = obj["metadata"]["name"]
        found = self.kube.get(ns, obj["kind"], name)
        if found is None:  # deleted in between: the next reconcile creates it
            raise ApiException(status=409, reason=f"{obj['kind']} {name} was deleted while being created")
        owner = controller_uid(found)
        if owner == uid and not found["metadata"].get("deletionTimestamp"):
            return found
        if found["metadata"].get("deletionTimestamp") or owner is not None:
            # one being deleted (ours too: it is going, not created), an earlier job of this
            # name still going (its pods get their grace period), or one whose owner is gone,
            # which the garbage collector removes: wait, quietly
            raise NameBusy(
                f"{obj['kind']} {name} is still being deleted, or is an earlier job's of this name"
            )
        raise Refused(
            409,
            f"{obj['kind']} {name} already exists and was not made by this job; "
            "delete it, or give the job another name",
        )

    def _refused(self, key, job: dict, plan, refusal: Refused, now: dt.datetime) -> float | None:
        """The Job controller's way with a refused create: a FailedCreate Event, the API
        server's message in status, exponential backoff; Failed/InvalidSpec when the
        objects themselves are invalid."""
        ns, name = key
        count = (self.refusals[key].count if key in self.refusals else 0) + 1
        gen = job["metadata"].get("generation")
        stamp = iso(now)
        status, event, delay = after_refusal(plan.status, refusal.code, refusal.message, stamp, gen, count)
        log.info("%s/%s: %s", ns, name, event[2])
        if delay is None:
            self.refusals.pop(key, None)
        else:  # before the status write, which may conflict: the backoff holds either way
            self.refusals[key] = Refusal(count, time.monotonic() + delay, gen)
        self._write_status(key, job, status, [event], stamp)
        return delay

    def _write_status(self, key, job: dict, status: dict, events: list[tuple], stamp: str) -> None:
        """The status as a merge patch against the job's, then its Events (only after the
        status write succeeded)."""
        patch = merge_patch(job.get("status") or {}, status)
        if patch:
            updated = self.kube.patch_job_status(*key, patch, job["metadata"].get("resourceVersion"))
            if _newer(updated, self.jobs.get(key)):
                self.jobs[key] = updated
            job = updated
        metrics.set_phase(key, status.get("phase"))
        metrics.set_goodput(key, status.get("goodput"))
        for event in events:
            self.events.submit(self._event, job, *event, stamp)

    def _after_apply(self, key, job: dict, plan, now: dt.datetime) -> None:
        ns, name = key
        if plan.register is not None:
            # before the pods go: a failure here is retried with the trainer's message still there
            registered = self._register_adapter(key, job, plan.register)
            if registered:
                plan.status["adapter"]["name"] = registered
                plan.events.append(
                    (
                        "Normal",
                        "AdapterRegistered",
                        f"adapter registered in the library as Adapter {registered}",
                    )
                )
        for pod in plan.delete:
            self.kube.delete_pod(ns, pod)
        for loss in plan.losses:
            metrics.count_loss(loss.kind, loss.reason)
        self._write_status(key, job, plan.status, plan.events, iso(now))
        if plan.delete_job:
            log.info("deleting %s/%s: ttlSecondsAfterFinished passed", ns, name)
            self.kube.delete_job(ns, name, job["metadata"]["uid"])

    def _event(self, job: dict, kind: str, reason: str, message: str, stamp: str) -> None:
        # Events are best effort and rate limited (like client-go's recorder), so a burst
        # of new jobs gets its pods first and its Events a little later.
        self.event_bucket.take()
        try:
            self.kube.event(job, kind, reason, message, stamp)
        except Exception as e:  # events are best effort
            log.debug("event %s for %s not posted: %s", reason, job["metadata"]["name"], e)

    # -- trainer progress (a thread) -------------------------------------------------------

    def poll_progress(self, interval_s: float, stopping: threading.Event, loop) -> None:
        """GET /progress from every worker of every running job: rank 0's changed answer
        queues a reconcile, which folds it into status.progress (one status write, as
        always); every rank's step feeds the stall check, and a stall found queues one too.
        Pods are known by (namespace, name): jobs of one name in two namespaces are two."""
        watch = RankWatch()

        def changed(key, pod, body):
            if watch.rank(pod) != 0:
                return  # status.progress is rank 0's; the other ranks only show they move
            seen = (pod[1], body)
            if self.progress.get(key) != seen:
                self.progress[key] = seen
                loop.call_soon_threadsafe(self.queue.add, key)

        poller = ProgressPoller(interval_s, fetch_progress, changed, answered=watch.answered)
        while not stopping.wait(interval_s):
            try:
                self._poll_round(poller, watch, interval_s, loop)
            except Exception:  # a bug here must not end progress and stall checks for good
                log.exception("progress poll round failed")

    def _poll_round(self, poller, watch, interval_s: float, loop) -> None:
        now = time.monotonic()
        targets, attempts = [], {}
        for key, job in list(self.jobs.items()):
            if (job.get("status") or {}).get("phase") != "Running":
                continue
            owned = self._owned(job, list(self.pods.get(key, {}).values()))
            pod_ids = []
            for pod in running_workers(owned, job["status"].get("attempt")):
                pod_id = (key[0], pod["metadata"]["name"])
                watch.asked(pod_id, pod_rank(pod), pod["spec"].get("nodeName"), now)
                targets.append((key, pod_id, pod["status"]["podIP"]))
                pod_ids.append(pod_id)
            if pod_ids:
                attempts[key] = (pod_ids, job)
        poller.tick(targets, now)
        watch.keep({pod_id for _, pod_id, _ in targets})
        for key in set(self.stalls) - set(attempts):
            self.stalls.pop(key, None)
        for key, (pod_ids, job) in attempts.items():
            deadline = finite((job.get("spec") or {}).get("progressDeadlineSeconds"))
            stall = find_stall(watch.ranks(pod_ids), now, deadline, interval_s)
            old = self.stalls.get(key)
            if stall is None:
                self.stalls.pop(key, None)
            elif old is None or old.pod != stall.pod:
                self.stalls[key] = stall
                log.warning("%s/%s: %s", *key, stall.message)
                loop.call_soon_threadsafe(self.queue.add, key)


class NameBusy(Exception):
    """A name the new attempt needs is held by an object on its way out."""


class Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclasses.dataclass(frozen=True)
class Refusal:
    count: int  # refusals in a row
    not_before: float  # monotonic time of the next try
    generation: int | None  # the spec they were for


def api_message(e: ApiException) -> str:
    """The API server's own words (its Status message), not the HTTP reason phrase."""
    try:
        return str(json.loads(e.body).get("message") or e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


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


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps each object's last handled spec to diff it for change handlers; this
    operator has none (a reconcile compares the spec with the status), so every event's
    deep copy of the whole body, a third of kopf's CPU in a burst, is skipped."""

    def build(self, *, body, extra_fields=None):
        return {}

    def fetch(self, *, body):
        return None

    def store(self, *, body, patch, essence) -> None:
        pass


CONTROLLER: Controller | None = None
STOPPING = threading.Event()


def terminated_container(pod: dict) -> bool:
    return any(
        "terminated" in (cs.get("state") or {})
        for cs in (pod.get("status") or {}).get("containerStatuses") or []
    )


def running_workers(pods: list[dict], attempt: int | None) -> list[dict]:
    """The pods of the attempt that run and have an address, by rank."""
    out = [
        p
        for p in pods
        if pod_attempt(p) == attempt
        and (p.get("status") or {}).get("phase") == "Running"
        and (p.get("status") or {}).get("podIP")
    ]
    return sorted(out, key=pod_rank)


def fetch_progress(address: str, port: int = PROGRESS_PORT, deadline_s: float = 2.0) -> dict | None:
    """The trainer's /progress, or None (starting up, busy, gone, too slow, too big, not
    a JSON object): never an error. The deadline is for the whole exchange, not per read:
    a trainer that trickles a byte a second cannot hold a fetcher for longer."""
    end = time.monotonic() + deadline_s
    try:
        with socket.create_connection((address, port), timeout=deadline_s) as sock:
            sock.settimeout(max(end - time.monotonic(), 0.001))
            sock.sendall(f"GET /progress HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            data = bytearray()
            while len(data) <= MAX_PROGRESS_RESPONSE:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return None
                sock.settimeout(remaining)
                chunk = sock.recv(16384)
                if not chunk:
                    break
                data += chunk
            else:
                return None  # larger than any progress report
        head, sep, payload = bytes(data).partition(b"\r\n\r\n")
        if not sep or head.split(b" ", 2)[1:2] != [b"200"]:
            return None
        body = json.loads(payload)
        return body if isinstance(body, dict) else None
    except (OSError, ValueError, IndexError):
        return None


MAX_PROGRESS_RESPONSE = 64 * 1024


def request_checkpoint(
    address: str, token: str | None, reason: str, port: int = PROGRESS_PORT, timeout_s: float = 3.0
) -> dict | None:
    """POST /checkpoint to a trainer: its answer ({"accepted", "coalesced", "step"}), or
    None (no token on the pod, unreachable, refused, not JSON)."""
    return control_request(address, token, "/checkpoint", {"reason": reason}, port, timeout_s)


def control_request(
    address: str, token: str | None, path: str, body: dict, port: int = PROGRESS_PORT, timeout_s: float = 3.0
) -> dict | None:
    """POST to a trainer's control path with the pod's bearer token: its JSON answer, or
    None (no token on the pod, unreachable, refused, not JSON)."""
    if not token:
        return None
    conn = http.client.HTTPConnection(address, port, timeout=timeout_s)
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        body = response.read(MAX_PROGRESS_RESPONSE)
        if response.status != 202:
            return None
        answer = json.loads(body)
        return answer if isinstance(answer, dict) else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def register(
    workers: int = 8, namespaces: list[str] | None = None, progress_interval_s: float = 10.0
) -> None:
    """Wire the controller to kopf (called once, before kopf.run)."""

    @kopf.on.startup()
    async def _startup(settings: kopf.OperatorSettings, **_):
        global CONTROLLER
        settings.posting.enabled = False  # our own Events say what happened; kopf's would be noise
        settings.scanning.disabled = True
        settings.watching.server_timeout = 300
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = NoDiffBase()
        CONTROLLER = Controller(Kube.from_environment(pool_size=workers * 2), workers)
        loop = asyncio.get_running_loop()
        CONTROLLER.task = loop.create_task(CONTROLLER.run_workers())

        # Trainer pods are watched directly, not through kopf: the operator sees every
        # change of every pod, and kopf's per-event bookkeeping (diff bases, deep
        # copies) would cost more than the reconciles themselves.
        def emit(kind, pod):
            loop.call_soon_threadsafe(CONTROLLER.pod_event, kind, pod)

        threading.Thread(
            target=CONTROLLER.poll_progress,
            args=(progress_interval_s, STOPPING, loop),
            daemon=True,
            name="poll-progress",
        ).start()

        def emit_node(kind, node):
            loop.call_soon_threadsafe(CONTROLLER.node_event, kind, node)

        threading.Thread(
            target=watch_nodes, args=(CONTROLLER.kube, emit_node, STOPPING), daemon=True, name="watch-nodes"
        ).start()
        for ns in namespaces or [None]:
            threading.Thread(
                target=watch_pods,
                args=(CONTROLLER.kube, ns, JOB_LABEL, emit, STOPPING),
                daemon=True,
                name=f"watch-pods-{ns or 'all'}",
            ).start()

    @kopf.on.cleanup()
    async def _cleanup(**_):
        STOPPING.set()

    @kopf.on.event(GROUP, VERSION, PLURAL)
    async def _job(event, **_):
        CONTROLLER.job_event(event["type"] or "ADDED", event["object"])
