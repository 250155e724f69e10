"""The operator: watches of FineTuneJobs, their pods and the nodes (list, then watch)
feed a deduplicating work queue (the machinery: runtime.py); a reconcile reads the cached job
and pods, asks kubetune.decision.decide() what to do and applies the plan: create
(idempotent), delete, one status patch, then events."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import json
import logging
import os
import secrets
import threading
import time

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubetune import metrics
from kubetune.api import ADAPTER_KIND, GROUP, PLURAL, VERSION, FineTuneJobSpec
from kubetune.decision.conditions import iso, merge_patch
from kubetune.decision.decide import Need, Plan, decide, needs_init_from
from kubetune.decision.pods import GONE, pod_attempt, pod_rank
from kubetune.decision.refusals import after_refusal
from kubetune.decision.reports import finite
from kubetune.gang import capacity_scope, gang_fit, without_gang_gate
from kubetune.kube import Kube, event_object
from kubetune.kueue import PRIORITY_BOOST_ANNOTATION
from kubetune.library import adapter_names, adapter_object, resolve_init_from, same_registration
from kubetune.manifests import (
    JOB_LABEL,
    PROGRESS_PORT,
    build_network_policy,
    control_token,
    controller_uid,
    with_control_token,
)
from kubetune.notices import Notice, notice, pods_on
from kubetune.policy import Policy, violations
from kubetune.runtime import (
    Allocator,
    Handoff,
    JobCache,
    ProgressPoller,
    TokenBucket,
    WorkQueue,
    resource_version,
    watch_collection,
    watch_nodes,
    watch_pods,
    worker,
)
from kubetune.stall import RankWatch, Stall, find_stall
from kubetune.trainer_client import control_request, fetch_progress, request_checkpoint

log = logging.getLogger("kubetune")
NETWORK_POLICY_ENV = "KUBETUNE_NETWORK_POLICY"  # {"namespace": ..., "podLabels": {...}}
RESYNC_S = 30.0  # a running job is looked at again at least this often
RETRY_S = 2.0
BOOST_RETRY_S = 5.0  # a Kueue Workload not found yet (Kueue makes it just after the pods)
# Pod changes come in bursts (bound, started, ready): look once they settled, so one
# status write covers them. New jobs and spec changes are looked at at once.
POD_SETTLE_S = 0.5
EVENTS_PER_S, EVENT_BURST = 10.0, 25


class Controller:
    def __init__(self, kube: Kube, workers: int = 8) -> None:
        self.kube = kube
        self.queue = WorkQueue()
        # made here, on the event loop (kopf's startup handler): its watch thread
        self.cache = JobCache(holder=self.queue.holder)
        self.jobs, self.pods = self.cache.jobs, self.cache.pods  # read-only views
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
            self.cache.forget(key)
            self.progress.pop(key, None)
            self.stalls.pop(key, None)
            self.first_seen.pop(key, None)
            self.refusals.pop(key, None)
            self.boosts.pop(key, None)
            self.starting = {s for s in self.starting if s[0] != key}
            self.asked = {a for a in self.asked if a[0] != key}
            metrics.forget_job(key)
            return
        if resource_version(body) == self.cache.job_version(key):
            return  # the echo of our own status write: nothing new
        self.cache.put_job(key, body)
        if not (body.get("status") or {}).get("attempt"):
            self.first_seen.setdefault(key, time.monotonic())  # a new job: time it to its pods
        self.queue.add(key)

    def pod_event(self, kind: str, body: dict) -> None:
        meta = body["metadata"]
        job = (meta.get("labels") or {}).get(JOB_LABEL)
        if not job:
            return
        key = (meta["namespace"], job)
        # the cached pod (decoded on read) matters only to a deletion
        cached = self.pods.get(key, {}).get(meta["name"]) if kind == "DELETED" else None
        if kind == "DELETED" and cached is not None and cached["metadata"].get("uid") != meta.get("uid"):
            # an earlier pod of this name (a standby deleted and made again): the cached
            # one is its successor and stays
            pass
        elif kind == "DELETED" and terminated_container(body) and key in self.jobs and controller_uid(body):
            # kept as its last state: an evicted trainer's exit code and termination message
            # (its checkpoint) must reach the reconcile even though the pod object is gone
            self.cache.put_pod(key, {**body, GONE: True})
        elif kind == "DELETED" or controller_uid(body) is None:
            # gone, or its job is (a deleted job's pods go after it: the garbage collector
            # deletes them once the job is gone), or not made by a FineTuneJob whatever its
            # labels say: nothing of it is kept
            self.cache.drop_pod(key, meta["name"])
        else:
            self.cache.put_pod(key, body)
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
        self.kube.fence()  # a replica that lost its Lease asks no trainer for anything
        pod = rank0["metadata"]["name"]
        answer = request_checkpoint(
            rank0["status"]["podIP"], control_token(rank0), found.reason, port=self.trainer_port
        )
        stamp = iso(dt.datetime.now(dt.UTC))
        workers = ", ".join(there)
        if answer is None:
            message = f"{found.reason}: the checkpoint request to {pod} failed; its workers there: {workers}"
            log.warning("%s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], message)
            self._event(job, "Warning", "CheckpointRequestFailed", message, stamp)
            return
        message = (
            f"{found.reason}: checkpoint requested of {pod} at step {answer.get('step')}"
            + (" (one was already under way)" if answer.get("coalesced") else "")
            + f"; its workers there: {workers}"
        )
        log.info("%s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], message)
        metrics.count_checkpoint_request()
        self._event(job, "Normal", "CheckpointRequested", message, stamp)

    async def run_workers(self) -> None:
        await asyncio.gather(
            *(worker(self.queue, self.pool, self.reconcile, RETRY_S) for _ in range(self.workers))
        )

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
        now = dt.datetime.now(dt.UTC)
        plan = self._decide(key, job, now)
        try:
            self._apply(key, job, plan)
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
                len(self.pods.get(key, {})),
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
                self.cache.put_job(key, fresh)
            return 0.05
        metrics.observe_reconcile(time.perf_counter() - t0)
        return plan.requeue_after if plan.requeue_after is not None else self._resync(plan)

    def _decide(self, key, job: dict, now: dt.datetime) -> Plan:
        """decide() on the cached pods, given what it asks for: the pods listed afresh
        (Need.POD_LIST), the nodes' free capacity for a gang (Need.CAPACITY; read, decided
        and the gates lifted under one lock, so two gangs never count the same room)."""
        inputs = {
            "problems": violations(job.get("spec") or {}, self.policy),
            "progress": self.progress.get(key),
            "stall": self.stalls.get(key),
            "avoid_nodes": self.avoided_nodes(),
            "noticed": tuple(sorted(self.notices)),
            "init_from": self._resolve_init_from(key, job),
        }
        pods = self._owned(job, list(self.pods.get(key, {}).values()))
        plan = decide(job, pods, now, pods_from_cache=True, **inputs)
        if plan.need is Need.POD_LIST:
            pods = self._owned(job, self.kube.list_pods(key[0], f"{JOB_LABEL}={key[1]}"))
            self.cache.replace_pods(key, pods)  # (not for a job deleted meanwhile)
            plan = decide(job, pods, now, **inputs)
        if plan.need is not Need.CAPACITY:
            return plan
        with self.gang_lock:
            # the scheduler's view, read fresh: nodes and the pods holding their capacity
            # (with gang.capacityView: namespaces, only the watched namespaces' pods)
            scope = self.capacity_namespaces
            held = self.kube.list_active_pods_in(scope) if scope else self.kube.list_active_pods()
            first = next(p for p in pods if p["metadata"]["name"] == plan.waiting[0])
            gang = gang_fit(first, len(plan.waiting), self.kube.list_nodes(), held)
            plan = decide(job, pods, now, gang=gang, **inputs)
            by_name = {p["metadata"]["name"]: p for p in pods}
            for name in plan.ungate:
                gates = without_gang_gate(by_name[name]) or None
                released = self.kube.patch_pod(key[0], name, {"spec": {"schedulingGates": gates}})
                self.cache.put_pod(key, released)
        return plan

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
        stamp = iso(dt.datetime.now(dt.UTC))
        self._event(job, "Warning", "AdapterNotRegistered", message, stamp)

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
        self.kube.fence()
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

    def _apply(self, key, job: dict, plan) -> None:
        """Create the new attempt's Service and pods; Refused when the API server turns one
        down for a reason a retry right away would not change."""
        ns, name = key
        uid = job["metadata"]["uid"]
        objects = [build_network_policy(name, uid, self.network_policy)] if self.network_policy else []
        objects += [plan.service] if plan.service else []
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
                    self.cache.put_pod(key, created)
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
            self.cache.put_job(key, updated)
            job = updated
        metrics.set_phase(key, status.get("phase"))
        metrics.set_goodput(key, status.get("goodput"))
        for event in events:
            self._event(job, *event, stamp)

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
        """Queue an Event for the events thread. The queue holds the Event itself, not the
        job: a burst of thousands of jobs must not keep their bodies alive for the minutes
        the queue can take to drain."""
        self.events.submit(self._post_event, event_object(job, kind, reason, message, stamp))

    def _post_event(self, event: dict) -> None:
        # Events are best effort and rate limited (like client-go's recorder), so a burst
        # of new jobs gets its pods first and its Events a little later.
        self.event_bucket.take()
        try:
            self.kube.post_event(event)
        except Exception as e:  # events are best effort
            log.debug("event %s for %s not posted: %s", event["reason"], event["involvedObject"]["name"], e)

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
        for key, job in self.cache.jobs_in_phase("Running"):
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


def register(
    workers: int = 8, namespaces: list[str] | None = None, progress_interval_s: float = 10.0
) -> None:
    """Wire the controller to kopf (called once, before kopf.run)."""

    @kopf.on.startup()
    async def _startup(settings: kopf.OperatorSettings, **_):
        global CONTROLLER
        settings.posting.enabled = False  # our own Events say what happened; kopf's would be noise
        settings.scanning.disabled = True
        CONTROLLER = Controller(Kube.from_environment(pool_size=workers * 2), workers)
        loop = asyncio.get_running_loop()
        CONTROLLER.task = loop.create_task(CONTROLLER.run_workers())
        handoff = Handoff(loop, STOPPING)

        def start_thread(name: str, target, *args) -> None:
            threading.Thread(target=target, args=args, daemon=True, name=name).start()

        # FineTuneJobs and their pods are watched directly (list, then watch), not through
        # kopf: kopf runs a task per object with its own queue and bookkeeping, which at
        # thousands of jobs cost more memory and CPU than the reconciles; the work queue
        # here already does what those tasks are for (one reconcile per job at a time).
        for ns in namespaces or [None]:
            start_thread(
                f"watch-jobs-{ns or 'all'}",
                watch_collection,
                CONTROLLER.kube,
                GROUP,
                VERSION,
                PLURAL,
                ns,
                lambda kind, job: handoff(CONTROLLER.job_event, kind, job),
                STOPPING,
            )
            start_thread(
                f"watch-pods-{ns or 'all'}",
                watch_pods,
                CONTROLLER.kube,
                ns,
                JOB_LABEL,
                lambda kind, pod: handoff(CONTROLLER.pod_event, kind, pod),
                STOPPING,
            )
        start_thread(
            "watch-nodes",
            watch_nodes,
            CONTROLLER.kube,
            lambda kind, node: handoff(CONTROLLER.node_event, kind, node),
            STOPPING,
        )
        start_thread("poll-progress", CONTROLLER.poll_progress, progress_interval_s, STOPPING, loop)
        start_thread("trim-memory", Allocator().trim_every, STOPPING)

    @kopf.on.cleanup()
    async def _cleanup(**_):
        STOPPING.set()
