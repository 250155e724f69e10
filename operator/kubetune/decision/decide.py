"""The decision: a FineTuneJob and the pods it owns -> a Plan (what to create, delete,
release, write and say). Pure: the handlers read the world, call decide(), and apply the
plan; when the plan needs more of the world (Need), they read it and decide again.

An attempt is one set of worker pods. Its loss is classified once, when the operator
moves status.attempt on; the next attempt's pods are created only after every pod of
the previous one has stopped, so a preempted worker can commit its final checkpoint
before its successor resumes from it."""

from __future__ import annotations

import copy
import datetime as dt
import enum
from dataclasses import dataclass, field

from pydantic import ValidationError

from kubetune.api import AUTO, FineTuneJobSpec, Phase
from kubetune.decision.conditions import (
    BACKOFF_LIMIT_EXCEEDED,
    CONFIG_ERROR,
    DEADLINE_EXCEEDED,
    FAILED,
    FAILED_CREATE,
    INVALID_SPEC,
    LOSS_NOT_FINITE,
    PODS_CREATED,
    QUEUED,
    RUNNING,
    SCHEDULED,
    STALLED,
    SUCCEEDED,
    SUSPENDED,
    TOO_MANY_PREEMPTIONS,
    WAITING_FOR_ADAPTER,
    WAITING_FOR_CAPACITY,
    WAITING_FOR_CONFIG,
    iso,
    parse_time,
    set_condition,
)
from kubetune.decision.pods import (
    TERMINAL,
    Loss,
    LossKind,
    classify_loss,
    config_error,
    is_gone,
    is_stopped,
    pod_attempt,
    pod_phase,
    pod_rank,
    termination_message,
    unschedulable_message,
)
from kubetune.decision.reports import (
    count,
    evaluation_from_message,
    known,
    lineage_from_message,
    loss_not_finite,
    progress_from_trainer,
    progress_summary,
    record_checkpoint,
    record_goodput,
    text,
)
from kubetune.gang import Fit, gated, queued_in_kueue
from kubetune.kueue import priority_boost
from kubetune.library import AdapterMissing
from kubetune.manifests import build_attempt, pod_group_name, pod_name
from kubetune.placement import min_gpu_memory
from kubetune_trainer import contract
from kubetune_trainer.config import InitFrom
from kubetune_trainer.library import adapter_record

# how long a missing Secret, ConfigMap or key may take to appear before the job fails
CONFIG_ERROR_GRACE_S = 60.0

ADAPTER_RECHECK_S = 10.0  # a warm start's Adapter is looked for again this often

GANG_RECHECK_S = 5.0  # capacity frees up without touching the job: look again this often


class Need(enum.Enum):
    """More of the world than decide() was given, which it needs before it can decide."""

    # the job's pods as the API server lists them: a worker missing from a watch cache may
    # only not be seen yet, and a loss is charged once, so it is never judged on a cache
    POD_LIST = "pod-list"
    # whether the gated workers fit on the nodes now (kubetune.gang.gang_fit, read fresh
    # and under the one lock that keeps two gangs from counting the same free capacity)
    CAPACITY = "capacity"


@dataclass
class Plan:
    status: dict
    need: Need | None = None  # decide again with it; nothing else of this plan is applied
    waiting: list[str] = field(default_factory=list)  # the gated workers (Need.CAPACITY)
    service: dict | None = None  # the attempt's headless Service (several workers), made first
    create: list[dict] = field(default_factory=list)  # pods
    delete: list[str] = field(default_factory=list)  # pod names, deleted with their grace period
    ungate: list[str] = field(default_factory=list)  # pod names whose gang gate is lifted
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    losses: list[Loss] = field(default_factory=list)
    delete_job: bool = False
    requeue_after: float | None = None
    # (Kueue Workload name, kueue.x-k8s.io/priority-boost): the running attempt's pod group
    workload_boost: tuple[str, int] | None = None
    start: list[str] = field(default_factory=list)  # standby pods to send POST /start
    # the finished adapter's library record (AdapterSpec dict): an Adapter object to create
    register: dict | None = None


class Ctx:
    """One reconcile: the job, its pods, the clock, and the plan being built."""

    def __init__(self, job: dict, pods: list[dict], now: dt.datetime) -> None:
        self.job = job
        self.name = job["metadata"]["name"]
        self.uid = job["metadata"]["uid"]
        self.gen = job["metadata"].get("generation")
        self.now = now
        self.now_s = iso(now)
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.plan = Plan(status=copy.deepcopy(job.get("status") or {}))
        self.st = self.plan.status
        self.progress: tuple | None = None
        self.gang: Fit | None = None
        self.stall = None
        self.avoid_nodes: tuple[str, ...] = ()  # nodes under a notice the scheduler does not see
        self.noticed: tuple[str, ...] = ()  # every node under a termination notice
        self.pods_from_cache = False

    def transition(
        self, phase: str, reason: str, message: str, event_type: str = "Normal", *, event: bool = True
    ) -> None:
        """A new phase or reason, with an Event unless `event` is False. A first attempt's
        way to Running (Created, Running) posts none: its status keeps both with their
        times (startTime, attemptStartTime, the Running condition), and an Event is one
        more write per job at a burst, the API server's busiest moment. Everything the
        status later overwrites (a retry, a preemption, a later attempt's start, the end)
        has its Event."""
        if event and (self.st.get("phase") != phase or self.st.get("reason") != reason):
            self.plan.events.append((event_type, reason, message))
        self.st["phase"] = phase
        self.st["reason"] = reason
        self.st["message"] = message

    def cond(self, kind: str, ok: bool, reason: str, message: str = "") -> None:
        set_condition(self.st, kind, ok, reason, message, self.now_s, self.gen)

    def fail(self, reason: str, message: str) -> None:
        self.transition(Phase.failed.value, reason, message, "Warning")
        self.cond(FAILED, True, reason, message)
        self.cond(RUNNING, False, reason, message)
        self.st.setdefault("completionTime", self.now_s)
        self.stop_active()

    def active(self) -> list[dict]:
        return [
            p for p in self.pods.values() if not is_stopped(p) and not p["metadata"].get("deletionTimestamp")
        ]

    def stop_active(self, spare_attempt: int | None = None) -> None:
        """Delete every running pod of the job (but spare_attempt's: a standby), once per
        plan however often it is asked."""
        self.plan.delete += [
            n
            for n in (p["metadata"]["name"] for p in self.active() if pod_attempt(p) != spare_attempt)
            if n not in self.plan.delete
        ]


def decide(
    job: dict,
    pods: list[dict],
    now: dt.datetime,
    problems: list[str] = (),
    progress: tuple | None = None,
    gang: Fit | None = None,
    stall=None,
    avoid_nodes=(),
    noticed=(),
    init_from: dict | str | None = None,
    pods_from_cache: bool = False,
) -> Plan:
    """What to do about one job now. Pure: same inputs, same plan. `progress` is the last
    (pod name, GET /progress body) polled from a trainer; `gang` whether the gated workers
    of the current attempt fit on the nodes now (kubetune.gang); `stall` a worker found
    stuck (kubetune.stall.Stall: pod, node, message); `noticed` the nodes under a
    termination notice (kubetune.notices); `init_from` spec.lora.initFrom.adapter resolved
    (kubetune.library.resolve_init_from: {adapter, uri, sha256}, or why it cannot be);
    `pods_from_cache` that `pods` come from a watch cache (a missing pod asks for Need.POD_LIST)."""
    c = Ctx(job, pods, now)
    c.progress = progress
    c.gang = gang
    c.stall = stall
    c.avoid_nodes = tuple(avoid_nodes)
    c.noticed = tuple(noticed)
    c.pods_from_cache = pods_from_cache
    st = c.st
    try:
        spec = FineTuneJobSpec.model_validate(job.get("spec") or {})
    except ValidationError as e:
        spec, problems = None, [*problems, *validation_messages(e)]

    if st.get("phase") in TERMINAL and not _revalidate(c, problems):
        return _finished(c, spec)
    if problems:
        c.fail(INVALID_SPEC, "; ".join(problems))
        return c.plan
    st["observedGeneration"] = c.gen
    st.setdefault("attempt", 0)
    st.setdefault("preemptions", 0)
    st.setdefault("failures", 0)
    spec = _pinned_init_from(c, spec, init_from)
    if spec is None:
        return c.plan

    if spec.suspend:
        return _suspend(c)
    if st.get("phase") == Phase.suspended.value:
        c.cond(SUSPENDED, False, "Resumed", "the job was resumed")
        st["attempt"] += 1  # a resume starts a fresh attempt: neither preemption nor failure
        st.pop("attemptStartTime", None)
        c.transition(
            Phase.pending.value,
            "Resumed",
            f"resumed: attempt {st['attempt']} starts from the last checkpoint",
        )

    deadline = spec.active_deadline_seconds
    started = parse_time(st.get("startTime"))
    if deadline and started and (now - started).total_seconds() >= deadline:
        c.fail(DEADLINE_EXCEEDED, f"the job ran longer than activeDeadlineSeconds={deadline}")
        return c.plan

    if st["attempt"] == 0:
        st["attempt"] = 1
        st.setdefault("startTime", c.now_s)
        st["progress"] = {
            "step": 0,
            "totalSteps": spec.training.max_steps,
            "summary": progress_summary(0, spec.training.max_steps),
        }
        c.transition(
            Phase.pending.value, "Created", f"attempt 1 of {spec.workers} worker(s) created", event=False
        )
    _attempt(c, spec)
    if deadline and started:
        left = deadline - (now - started).total_seconds()
        c.plan.requeue_after = min(c.plan.requeue_after or left, left)
    return c.plan


def needs_init_from(job: dict) -> str | None:
    """The Adapter a job's warm start names, while it is not pinned in its status yet (also
    for a job that failed for want of it: a spec change has it looked up again)."""
    init = ((job.get("spec") or {}).get("lora") or {}).get("initFrom") or {}
    if not isinstance(init, dict) or not init.get("adapter") or (job.get("status") or {}).get("initFrom"):
        return None
    return init["adapter"]


def _pinned_init_from(c: Ctx, spec: FineTuneJobSpec, resolved: dict | str | None) -> FineTuneJobSpec | None:
    """The spec the pods get: spec.lora.initFrom.adapter replaced by the adapter's folder
    and sha256, resolved once and kept in status.initFrom (the same for every attempt,
    whatever happens to the Adapter object later). None: the job failed, or waits for
    its Adapter to exist (Pending/WaitingForAdapter; activeDeadlineSeconds bounds it)."""
    init = spec.lora.init_from
    if init is None or init.adapter is None:
        return spec
    pinned = c.st.get("initFrom")
    if not pinned:
        if isinstance(resolved, AdapterMissing):
            c.transition(Phase.pending.value, WAITING_FOR_ADAPTER, str(resolved))
            c.plan.requeue_after = ADAPTER_RECHECK_S
            return None
        if not isinstance(resolved, dict):
            c.fail(INVALID_SPEC, resolved or f"spec.lora.initFrom.adapter {init.adapter}: not looked up")
            return None
        c.st["initFrom"] = pinned = resolved
        c.plan.events.append(
            (
                "Normal",
                "WarmStart",
                f"starts from Adapter {init.adapter} ({pinned['uri']}, sha256 {pinned['sha256'][:12]})",
            )
        )
    lora = spec.lora.model_copy(update={"init_from": InitFrom.model_validate(pinned)})
    return spec.model_copy(update={"lora": lora})


def validation_messages(e: ValidationError) -> list[str]:
    return [f"spec.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]


def _revalidate(c: Ctx, problems: list[str]) -> bool:
    """A job that failed validation gets another look when its spec changes."""
    st = c.st
    retry = st.get("reason") == INVALID_SPEC and st.get("observedGeneration") != c.gen and not problems
    if retry:
        for key in ("phase", "reason", "message", "completionTime"):
            st.pop(key, None)
        c.cond(FAILED, False, "SpecChanged", "the spec changed and is valid now")
    return retry


def _finished(c: Ctx, spec: FineTuneJobSpec | None) -> Plan:
    c.stop_active()
    ttl = spec.ttl_seconds_after_finished if spec else None
    done = parse_time(c.st.get("completionTime"))
    if ttl is not None and done:
        left = ttl - (c.now - done).total_seconds()
        if left <= 0:
            c.plan.delete_job = True
        else:
            c.plan.requeue_after = left
    return c.plan


def _suspend(c: Ctx) -> Plan:
    c.stop_active()
    still_running = [p for p in c.pods.values() if not is_stopped(p)]
    if still_running:
        c.cond(SUSPENDED, False, "Suspending", f"waiting for {len(still_running)} pod(s) to stop")
        return c.plan
    c.transition(Phase.suspended.value, "Suspended", "the job is suspended; its pods were stopped")
    c.cond(SUSPENDED, True, "Suspended", "the job is suspended")
    c.cond(RUNNING, False, "Suspended", "the job is suspended")
    c.st.pop("attemptStartTime", None)
    return c.plan


def _attempt(c: Ctx, spec: FineTuneJobSpec) -> None:
    st = c.st
    attempt = st["attempt"]
    current = {pod_rank(p): p for p in c.pods.values() if pod_attempt(p) == attempt}
    older = [p for p in c.pods.values() if pod_attempt(p) < attempt]
    c.plan.delete += [
        p["metadata"]["name"]
        for p in older
        if not is_stopped(p) and not p["metadata"].get("deletionTimestamp")
    ]

    if not st.get("attemptStartTime"):
        # start the attempt once the previous one has fully stopped
        if any(not is_stopped(p) for p in older):
            c.plan.requeue_after = 2.0
            return
        # a pod of an attempt not started yet is a standby; one that ended before its turn
        # (its own node reclaimed) is no loss of this attempt: it is deleted, and once it
        # is gone a fresh one is made
        current = {r: p for r, p in current.items() if not is_gone(p)}
        ended = [p for p in current.values() if is_stopped(p) or p["metadata"].get("deletionTimestamp")]
        if ended:
            c.plan.delete += [
                p["metadata"]["name"] for p in ended if not p["metadata"].get("deletionTimestamp")
            ]
            c.plan.requeue_after = 1.0
            return
        seen = (st.get("progress") or {}).get("step") if attempt > 1 else None
        made = build_attempt(c.name, c.uid, spec, attempt, st["preemptions"], c.avoid_nodes, count(seen))
        c.plan.create += made.pods
        c.plan.service = made.service
        st["attemptStartTime"] = c.now_s
        if current:
            # its standby is there already, and the attempt before has stopped: told to
            # start now (one still loading starts when it has loaded), observed at once
            c.plan.start = [
                p["metadata"]["name"] for p in current.values() if (p.get("status") or {}).get("podIP")
            ]
            c.plan.requeue_after = 0.5
        if st.get("reason") == FAILED_CREATE:  # a retry after a refusal: it went through
            c.transition(
                Phase.pending.value, "Created", f"attempt {attempt} of {spec.workers} worker(s) created"
            )
            c.cond(PODS_CREATED, True, "Created", "the attempt's pods were created")
        return

    names = {r: pod_name(c.name, attempt, r) for r in range(spec.workers)}
    rank0 = current.get(0)
    if rank0 is not None and pod_phase(rank0) == Phase.succeeded.value:
        return _succeeded(c, rank0, spec)
    losses = [
        classify_loss(current.get(r), n)
        for r, n in names.items()
        if current.get(r) is None or pod_phase(current[r]) == Phase.failed.value
    ]
    if losses and c.pods_from_cache and any(loss.reason == "PodDeleted" for loss in losses):
        c.plan.need = Need.POD_LIST
        return None
    if losses:
        return _lost(c, spec, losses)
    pods = list(current.values())
    problem = config_error(pods)
    if problem:
        started = parse_time(st.get("attemptStartTime"))
        left = CONFIG_ERROR_GRACE_S - ((c.now - started).total_seconds() if started else CONFIG_ERROR_GRACE_S)
        if left > 0:
            # a Secret made a moment after the job (External Secrets, a GitOps sync) is normal
            c.transition(
                Phase.pending.value,
                WAITING_FOR_CONFIG,
                f"{problem}; the job fails if it is still missing {left:.0f} s from now",
                "Warning",
            )
            c.plan.requeue_after = left
            return None
        return c.fail(INVALID_SPEC, problem)
    waiting = sorted(p["metadata"]["name"] for p in pods if gated(p))
    if waiting:
        return _admit_gang(c, waiting, spec.workers)
    if any(queued_in_kueue(p) for p in pods):
        message = f"queued in Kueue's LocalQueue {spec.queue_name}: its pod group waits for admission"
        c.cond(SCHEDULED, False, QUEUED, message)
        if c.st.get("phase") != Phase.preempted.value:
            c.transition(Phase.pending.value, QUEUED, message)
        return None
    if c.stall is not None and c.stall.pod in names.values():
        # stuck, not gone: the attempt is replaced as an application failure
        return _lost(c, spec, [Loss(LossKind.FAILURE, c.stall.pod, c.stall.node, STALLED, c.stall.message)])
    _observe_running(c, pods, spec)
    _observe_progress(c, rank0)
    _kueue_boost(c, spec)
    _standby(c, spec, current)


def _standby(c: Ctx, spec: FineTuneJobSpec, current: dict[int, dict]) -> None:
    """A single-worker attempt on a node under a termination notice: its successor starts
    now on other capacity (a standby: it loads, then waits for POST /start), so the resume
    after the reclaim skips the schedule, the start and the model load. The notice
    withdrawn while the attempt still runs: the standby goes."""
    attempt = c.st["attempt"]
    successors = [p for p in c.pods.values() if pod_attempt(p) == attempt + 1 and not is_gone(p)]
    ended = [p for p in successors if is_stopped(p) or p["metadata"].get("deletionTimestamp")]
    if (
        ended
    ):  # a standby that ended (its own node taken, or withdrawn): gone first (its name is the new one's)
        c.plan.delete += [p["metadata"]["name"] for p in ended if not p["metadata"].get("deletionTimestamp")]
        return
    standby = successors
    on_notice = sorted({p["spec"].get("nodeName") for p in current.values()} & set(c.noticed))
    if not on_notice:
        # (not while the attempt's own pods are being stopped: a node that vanished with
        # its notice leaves its pods for a moment, and their successor is this standby)
        going = [p["metadata"]["name"] for p in standby if not p["metadata"].get("deletionTimestamp")]
        if going and not any(p["metadata"].get("deletionTimestamp") for p in current.values()):
            c.plan.delete += going
            c.plan.events.append(
                ("Normal", "StandbyWithdrawn", f"the notice is over: attempt {attempt + 1}'s standby goes")
            )
        return
    if standby or not (spec.spot.standby and spec.workers == 1) or c.st.get("phase") != Phase.running.value:
        return
    avoid = tuple(sorted({*c.avoid_nodes, *on_notice}))
    seen = count((c.st.get("progress") or {}).get("step"))
    made = build_attempt(c.name, c.uid, spec, attempt + 1, c.st["preemptions"] + 1, avoid, seen, standby=True)
    c.plan.create += made.pods
    c.plan.service = made.service
    c.plan.events.append(
        (
            "Normal",
            "StandbyCreated",
            f"node {', '.join(on_notice)} announced its reclaim: attempt {attempt + 1} starts on other "
            "capacity and waits, loaded, to resume from the checkpoint this attempt saves",
        )
    )


def _kueue_boost(c: Ctx, spec: FineTuneJobSpec) -> None:
    """For a job in a Kueue queue: its running pod group's priority boost, from the age of
    its last checkpoint (kubetune.kueue), so Kueue preempts the job that loses least."""
    if not spec.queue_name:
        return
    committed = parse_time((c.st.get("lastCheckpoint") or {}).get("time"))
    age = (c.now - committed).total_seconds() if committed else None
    c.plan.workload_boost = (pod_group_name(c.name, c.st["attempt"]), priority_boost(age))


def _admit_gang(c: Ctx, waiting: list[str], workers: int) -> None:
    """Lift the gang gate of every worker at once, or none while they do not all fit."""
    if c.gang is None:
        c.plan.need, c.plan.waiting = Need.CAPACITY, waiting
        return
    if c.gang.ok:
        c.plan.ungate = waiting
        c.cond(SCHEDULED, False, "GangAdmitted", f"all {workers} workers released to the scheduler")
        c.plan.events.append(("Normal", "GangAdmitted", f"attempt {c.st['attempt']}: {c.gang.message}"))
        return
    c.cond(SCHEDULED, False, WAITING_FOR_CAPACITY, c.gang.message)
    if c.st.get("phase") != Phase.preempted.value:
        c.transition(
            Phase.pending.value,
            WAITING_FOR_CAPACITY,
            f"no worker starts until all {workers} can be placed: {c.gang.message}",
            "Warning",
        )
    c.plan.requeue_after = GANG_RECHECK_S


def _observe_progress(c: Ctx, rank0: dict | None) -> None:
    """The trainer's own progress, when it comes from this attempt's rank 0."""
    if rank0 is None or not c.progress or c.progress[0] != rank0["metadata"]["name"]:
        return
    if c.progress[1].get("phase") == "standby":
        c.plan.start = [rank0["metadata"]["name"]]  # its attempt's turn: the one before has stopped
        return
    if c.progress[1].get("phase") in ("starting", "loading"):
        return  # a resumed trainer reports step 0 until its checkpoint is loaded
    body = c.progress[1]
    new = progress_from_trainer(body)
    old = c.st.get("progress") or {}
    if not (new.get("updatedAt") and new["updatedAt"] >= (old.get("updatedAt") or "")):
        return
    # what the trainer has not reported yet (the loss right after a resume) stays as it was
    c.st["progress"] = {**old, **new}
    record_goodput(c.st, body)
    record_checkpoint(c.st, body.get("lastCheckpoint"))
    bad = loss_not_finite(body)
    was = next((x for x in c.st.get("conditions") or [] if x["type"] == LOSS_NOT_FINITE), None)
    if bad:
        c.st["progress"].pop("loss", None)  # shown as none, never as a stale finite value
        message = (
            f"the training loss is {bad} at step {new.get('step', 0)}: the run is diverging or "
            "overflowing (fp16 compute often does); lower training.learningRate or use "
            "quantization.computeDtype bfloat16/float32"
        )
        if not (was and was["status"] == "True"):
            c.plan.events.append(("Warning", LOSS_NOT_FINITE, message))
        c.cond(LOSS_NOT_FINITE, True, LOSS_NOT_FINITE, message)
    elif was and was["status"] == "True":
        c.cond(LOSS_NOT_FINITE, False, "LossFinite", "the training loss is finite again")


def memory_hint(spec: FineTuneJobSpec) -> str:
    """What an automatic GPU-memory requirement adds to a scheduler's refusal: the
    generic "didn't match node affinity" does not say that a number was involved."""
    if spec.resources.min_gpu_memory_mib != AUTO or spec.resources.gpus == 0:
        return ""
    mib, _ = min_gpu_memory(spec)
    if not mib:
        return ""
    return (
        f" (minGpuMemoryMiB auto: the job's estimate is {mib} MiB per GPU, see `kubetune render`;"
        " set resources.minGpuMemoryMiB to a number to override)"
    )


def _observe_running(c: Ctx, pods: list[dict], spec: FineTuneJobSpec) -> None:
    workers = spec.workers
    unschedulable = unschedulable_message(pods)
    if unschedulable:
        unschedulable += memory_hint(spec)
        c.cond(SCHEDULED, False, "Unschedulable", unschedulable)
        if c.st.get("phase") != Phase.preempted.value:
            c.transition(
                Phase.pending.value, "Unschedulable", f"waiting for nodes: {unschedulable}", "Warning"
            )
        return
    if all(p["spec"].get("nodeName") for p in pods) and len(pods) == workers:
        c.cond(SCHEDULED, True, "Scheduled", "every worker is bound to a node")
    running = [p for p in pods if pod_phase(p) == Phase.running.value]
    if len(running) == workers:
        nodes = ", ".join(sorted({p["spec"]["nodeName"] for p in running}))
        c.transition(
            Phase.running.value,
            "Running",
            f"attempt {c.st['attempt']}: {workers} worker(s) on {nodes}",
            event=c.st["attempt"] > 1,
        )
        c.cond(RUNNING, True, "Running", f"attempt {c.st['attempt']} running")


def adapter_registration(c: Ctx, spec: FineTuneJobSpec, message: dict) -> dict | None:
    """The library record of the job's adapter (kubetune_trainer.library.adapter_record,
    as the trainer wrote adapter.json), with the S3 access needed to verify it."""
    adapter = c.st.get("adapter") or {}
    if not (adapter.get("uri") and adapter.get("sha256") and adapter.get("sizeBytes") is not None):
        return None
    try:
        record = adapter_record(
            spec,
            {k: adapter[k] for k in ("uri", "sha256", "sizeBytes")},
            lineage=lineage_from_message(message),
            evaluation=c.st.get("evaluation"),
            goodput=c.st.get("goodput"),
            steps=(c.st.get("progress") or {}).get("step"),
            source={"name": c.name, "namespace": c.job["metadata"].get("namespace"), "uid": c.uid},
            created=c.now_s,
        )
    except ValidationError:
        return None  # (a message the trainer did not write: no record rather than a wrong one)
    storage = spec.storage
    record["storage"] = {
        k: v
        for k, v in {
            "endpoint": storage.endpoint,
            "region": storage.region,
            "secretName": storage.secret_ref.name if storage.secret_ref else None,
        }.items()
        if v
    }
    return record


def _succeeded(c: Ctx, rank0: dict, spec: FineTuneJobSpec) -> None:
    msg = termination_message(rank0)
    st = c.st
    if isinstance(msg.get(contract.ADAPTER), dict):
        adapter = known(
            msg[contract.ADAPTER], {"uri": text, "sha256": lambda v: text(v, 64), "sizeBytes": count}
        )
        if adapter.get("uri"):
            st["adapter"] = adapter
    evaluation = evaluation_from_message(msg)
    if evaluation:
        st["evaluation"] = evaluation
    record_checkpoint(st, msg.get(contract.CHECKPOINT))
    record_goodput(st, msg)
    step = count(msg.get(contract.STEP))
    if step is not None:
        total = (st.get("progress") or {}).get("totalSteps", step)
        st["progress"] = {
            **(st.get("progress") or {}),
            "step": step,
            "summary": progress_summary(step, total),
        }
    st["completionTime"] = c.now_s
    c.plan.register = adapter_registration(c, spec, msg)
    where = f"; adapter at {st['adapter']['uri']}" if st.get("adapter") else ""
    c.transition(Phase.succeeded.value, "Succeeded", f"training finished{where}")
    c.cond(SUCCEEDED, True, "Succeeded", "training finished")
    c.cond(RUNNING, False, "Succeeded", "training finished")
    c.stop_active()


def _lost(c: Ctx, spec: FineTuneJobSpec, losses: list[Loss]) -> None:
    st = c.st
    c.plan.losses = losses
    for loss in losses:
        if loss.pod in c.pods:
            record_checkpoint(st, termination_message(c.pods[loss.pod]).get(contract.CHECKPOINT))
            record_goodput(st, termination_message(c.pods[loss.pod]))
    worst = next(
        loss
        for kind in (LossKind.PERMANENT, LossKind.FAILURE, LossKind.PREEMPTION)
        for loss in losses
        if loss.kind == kind
    )
    where = f" on node {worst.node}" if worst.node else ""
    detail = f"worker {worst.pod}{where}: {worst.reason}" + (f": {worst.message}" if worst.message else "")
    # the next attempt's standby, if a notice started one, is that attempt (a job that
    # fails for good loses it with the rest once finished)
    c.stop_active(spare_attempt=st["attempt"] + 1)
    if worst.kind is LossKind.PERMANENT:
        return c.fail(CONFIG_ERROR, f"{detail} (configuration errors are not retried)")
    if worst.kind is LossKind.FAILURE:
        st["failures"] += 1
        if st["failures"] > spec.backoff_limit:
            return c.fail(
                BACKOFF_LIMIT_EXCEEDED,
                f"{st['failures']} failure(s) > backoffLimit {spec.backoff_limit}; last: {detail}",
            )
        c.plan.events.append(("Warning", "AttemptFailed", f"attempt {st['attempt']} failed: {detail}"))
        c.transition(
            Phase.pending.value, "Restarting", f"retrying after failure {st['failures']}: {detail}", "Warning"
        )
    else:
        st["preemptions"] += 1
        if st["preemptions"] > spec.spot.max_preemptions:
            return c.fail(
                TOO_MANY_PREEMPTIONS,
                f"{st['preemptions']} preemption(s) > maxPreemptions "
                f"{spec.spot.max_preemptions}; last: {detail}",
            )
        c.transition(
            Phase.preempted.value,
            "Preempted",
            f"attempt {st['attempt']} preempted ({detail}); resuming from the last checkpoint",
            "Warning",
        )
    c.cond(RUNNING, False, c.st["reason"], detail)
    st["attempt"] += 1
    st.pop("attemptStartTime", None)
    c.plan.requeue_after = 1.0
