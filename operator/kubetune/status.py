"""Pure reconcile logic: a FineTuneJob and the pods it owns -> what to do and the new
status. No I/O: the handlers read the world, call decide(), and apply the Plan.

An attempt is one set of worker pods. Its loss is classified once, when the operator
moves status.attempt on; the next attempt's pods are created only after every pod of
the previous one has stopped, so a preempted worker can commit its final checkpoint
before its successor resumes from it."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from kubetune.api import AUTO, FineTuneJobSpec, Phase
from kubetune.gang import Fit, gated, queued_in_kueue
from kubetune.kueue import priority_boost
from kubetune.library import AdapterMissing
from kubetune.manifests import ATTEMPT_LABEL, RANK_LABEL, build_pods, pod_group_name, pod_name
from kubetune.placement import min_gpu_memory
from kubetune_trainer.config import InitFrom
from kubetune_trainer.library import adapter_record, clip_samples

# Condition types and reasons (CamelCase constants, as Kubernetes does).
SCHEDULED, RUNNING, SUSPENDED, SUCCEEDED, FAILED = "Scheduled", "Running", "Suspended", "Succeeded", "Failed"
INVALID_SPEC = "InvalidSpec"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
TOO_MANY_PREEMPTIONS = "TooManyPreemptions"
DEADLINE_EXCEEDED = "DeadlineExceeded"
CONFIG_ERROR = "ConfigError"
WAITING_FOR_CAPACITY = "WaitingForCapacity"
QUEUED = "Queued"  # in Kueue, waiting for its admission
LOSS_NOT_FINITE = "LossNotFinite"
FAILED_CREATE = "FailedCreate"
WAITING_FOR_CONFIG = "WaitingForConfig"
STALLED = "Stalled"  # a worker that stopped finishing optimizer steps (kubetune.stall)
# how long a missing Secret, ConfigMap or key may take to appear before the job fails
CONFIG_ERROR_GRACE_S = 60.0
PODS_CREATED = "PodsCreated"  # a condition only once a create was refused
# 400 Bad Request, 422 Invalid: the objects themselves are wrong, and a retry never helps.
# Anything else (403 from a quota, a missing ServiceAccount or PriorityClass) may pass later.
PERMANENT_CREATE_CODES = (400, 422)
CREATE_BACKOFF_MAX_S = 300.0
WAITING_FOR_ADAPTER = "WaitingForAdapter"
ADAPTER_RECHECK_S = 10.0  # a warm start's Adapter is looked for again this often
GANG_RECHECK_S = 5.0  # capacity frees up without touching the job: look again this often

EX_TEMPFAIL = 75  # the trainer stopped on request after committing a checkpoint
PERMANENT_EXIT_CODES = range(64, 79)  # sysexits: usage/config errors, never retried (75 aside)
PREEMPTION_POD_REASONS = {
    "Evicted",
    "NodeLost",
    "Terminated",
    "Shutdown",
    "NodeShutdown",
    "UnexpectedAdmissionError",
}
TERMINAL = {Phase.succeeded.value, Phase.failed.value}


@dataclass
class Loss:
    kind: str  # "preemption" | "failure" | "permanent"
    pod: str
    node: str | None
    reason: str
    message: str


@dataclass
class Plan:
    status: dict
    create: list[dict] = field(default_factory=list)
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


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None


# -- reading pods ------------------------------------------------------------------------


def pod_attempt(pod: dict) -> int:
    return int(pod["metadata"].get("labels", {}).get(ATTEMPT_LABEL, "0"))


def pod_rank(pod: dict) -> int:
    return int(pod["metadata"].get("labels", {}).get(RANK_LABEL, "0"))


def pod_phase(pod: dict) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def terminated(pod: dict) -> dict | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "terminated" in state:
            return state["terminated"]
    return None


def condition(pod: dict, kind: str) -> dict | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def termination_message(pod: dict) -> dict:
    """The trainer's JSON termination message; {} when absent or not JSON (log tail)."""
    term = terminated(pod) or {}
    try:
        msg = json.loads(term.get("message") or "")
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}


# What a trainer says (its /progress body, its termination message) is its word, not
# trusted: only values of the expected type go into status. A NaN, an infinity or a string
# where a number belongs would make the status write invalid JSON or fail the schema,
# and the job's status would stop moving.
MAX_COUNT = 2**53


def finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def count(v) -> int | None:
    """A non-negative whole number (a step, a size), or None."""
    f = finite(v)
    return int(f) if f is not None and f == int(f) and 0 <= f < MAX_COUNT else None


def text(v, limit: int = 512) -> str | None:
    return v[:limit] if isinstance(v, str) else None


def known(values: dict, kinds: dict) -> dict:
    """values' keys in kinds, each through its checker; the ones that fail left out."""
    out = {k: kinds[k](values.get(k)) for k in kinds if k in values}
    return {k: v for k, v in out.items() if v is not None}


GOODPUT_SECONDS = (
    "usefulSeconds",
    "lostSeconds",
    "recomputedSeconds",
    "restartSeconds",
    "waitingSeconds",
    "otherSeconds",
    "wallSeconds",
)


def goodput_from_trainer(report) -> dict | None:
    """status.goodput from the trainer's goodput report (its /progress or termination
    message): known keys, right types, finite and in range; None when nothing is usable."""
    if not isinstance(report, dict):
        return None
    out = {}
    ratio = finite(report.get("ratio"))
    if ratio is not None and 0 <= ratio <= 1:
        out["ratio"] = round(ratio, 4)
    for key in GOODPUT_SECONDS:
        v = finite(report.get(key))
        if v is not None and v >= 0:
            out[key] = round(v, 1)
    for key in ("stepsRecomputed", "attempts"):
        v = count(report.get(key))
        if v is not None:
            out[key] = v
    return out if "usefulSeconds" in out else None


def record_goodput(status: dict, source: dict) -> None:
    """status.goodput from a /progress body or a termination message, when it has one."""
    goodput = goodput_from_trainer(source.get("goodput"))
    if goodput:
        status["goodput"] = goodput


def record_checkpoint(status: dict, ref) -> None:
    """status.lastCheckpoint from what a trainer reports as committed (its termination
    message's checkpoint, /progress's lastCheckpoint while it runs; known keys only)."""
    if isinstance(ref, dict):
        checkpoint = known(ref, {"step": count, "uri": text, "time": text})
        if checkpoint.get("step") is not None:
            old = status.get("lastCheckpoint") or {}
            # a resumed trainer names its checkpoint without the time it was committed at
            status["lastCheckpoint"] = (
                {**old, **checkpoint} if old.get("step") == checkpoint["step"] else checkpoint
            )


# set by the pod cache on a deleted pod's last state, which it keeps (the exit code and
# termination message of an evicted trainer must reach the reconcile): not in the API now
GONE = "kubetuneGone"


def is_gone(pod: dict) -> bool:
    return bool(pod.get(GONE))


def is_stopped(pod: dict) -> bool:
    return pod_phase(pod) in TERMINAL


def classify_loss(pod: dict | None, name: str) -> Loss:
    """Why a worker of the current attempt is gone: preemption (infrastructure took it;
    not charged to backoffLimit), failure (the application; charged) or permanent
    (a configuration error the trainer reported; never retried)."""
    if pod is None:
        return Loss("preemption", name, None, "PodDeleted", "the pod was deleted")
    node = pod["spec"].get("nodeName")
    # the kubelet's, the Eviction API's and the taint manager's; Kueue's own when it
    # preempts a pod group (TerminationTarget)
    disruption = condition(pod, "DisruptionTarget") or condition(pod, "TerminationTarget")
    if disruption and disruption.get("status") == "True":
        return Loss(
            "preemption",
            name,
            node,
            disruption.get("reason") or "DisruptionTarget",
            disruption.get("message") or "",
        )
    status = pod.get("status") or {}
    if status.get("reason") in PREEMPTION_POD_REASONS:
        return Loss("preemption", name, node, status["reason"], status.get("message") or "")
    term = terminated(pod) or {}
    code = term.get("exitCode")
    summary = text(termination_message(pod).get("error")) or text(term.get("message")) or ""
    if code == EX_TEMPFAIL:
        return Loss("preemption", name, node, "StoppedForPreemption", "the trainer checkpointed and stopped")
    if pod["metadata"].get("deletionTimestamp") and code in (137, 143):
        return Loss("preemption", name, node, "PodDeleted", f"killed while being deleted (exit {code})")
    if term.get("reason") == "OOMKilled":
        return Loss(
            "failure",
            name,
            node,
            "OOMKilled",
            "out of memory: raise resources.memory, or lower training.batchSize or dataset.maxSeqLength, "
            "or enable training.gradientCheckpointing",
        )
    if code in PERMANENT_EXIT_CODES:
        return Loss("permanent", name, node, CONFIG_ERROR, summary or f"exit code {code}")
    return Loss("failure", name, node, "Error", summary or f"exit code {code}")


# What in a CreateContainerConfigError says the spec itself is wrong. The kubelet reports
# passing trouble under the same reason ("failed to sync secret cache: timed out waiting
# for the condition" while its watch of a new Secret catches up) and retries it itself.
PERMANENT_CONFIG_ERRORS = ("not found", "couldn't find key")


def config_error(pods: list[dict]) -> str | None:
    """The kubelet's word on a spec it cannot run: a missing Secret, ConfigMap or key.
    (The operator never reads Secrets itself: least privilege.)"""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            message = waiting.get("message") or ""
            if waiting.get("reason") == "InvalidImageName" or (
                waiting.get("reason") == "CreateContainerConfigError"
                and any(m in message for m in PERMANENT_CONFIG_ERRORS)
            ):
                return f"{pod['metadata']['name']}: {message or waiting['reason']}"
    return None


def unschedulable_message(pods: list[dict]) -> str | None:
    for pod in pods:
        cond = condition(pod, "PodScheduled")
        if cond and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return cond.get("message") or "no node fits the pod"
    return None


# -- status helpers ----------------------------------------------------------------------


def set_condition(
    status: dict, kind: str, ok: bool, reason: str, message: str, now: str, gen: int | None
) -> None:
    """Kubernetes semantics: lastTransitionTime changes only when the status flips."""
    value = "True" if ok else "False"
    conditions = status.setdefault("conditions", [])
    old = next((c for c in conditions if c["type"] == kind), None)
    new = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message[:1024],
        "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == value else now,
    }
    if gen is not None:
        new["observedGeneration"] = gen
    if old:
        conditions[conditions.index(old)] = new
    else:
        conditions.append(new)


def merge_patch(old: dict, new: dict) -> dict:
    """The RFC 7386 merge patch turning old into new: removed keys become null (a key
    merely left out of a merge patch would be kept by the server)."""
    patch = {k: None for k in old if k not in new}
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            sub = merge_patch(old[k], v)
            if sub:
                patch[k] = sub
        elif old.get(k) != v or k not in old:
            patch[k] = v
    return patch


def progress_summary(step: int, total: int) -> str:
    pct = int(100 * step / total) if total else 0
    return f"{step}/{total} ({pct}%)"


def format_eta(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m}m" if h else f"{m}m{s % 60}s" if m else f"{s}s"


def progress_from_trainer(p: dict) -> dict:
    """status.progress from the trainer's GET /progress (known keys only, typed; a value
    of the wrong type, NaN or infinite is left out)."""
    step, total = count(p.get("step")) or 0, count(p.get("totalSteps")) or 0

    def num(key):
        v = finite(p.get(key))
        return round(v, 4) if v is not None else None

    out = {
        "step": step,
        "totalSteps": total,
        "summary": progress_summary(step, total),
        "epoch": num("epoch"),
        "loss": num("loss"),
        "evalLoss": num("evalLoss"),
        "tokensPerSecond": num("tokensPerSecond"),
        "eta": format_eta(num("etaSeconds")),
        "updatedAt": text(p.get("updatedAt"), 64),
    }
    return {k: v for k, v in out.items() if v is not None}


def loss_not_finite(p: dict) -> str | None:
    """ "nan" or "inf" when the trainer reports a loss that is not a finite number."""
    v = p.get("loss")
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf"
    if isinstance(v, str) and v.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return "nan" if "nan" in v.lower() else "inf"
    return None


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

    def transition(self, phase: str, reason: str, message: str, event_type: str = "Normal") -> None:
        if self.st.get("phase") != phase or self.st.get("reason") != reason:
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


# -- the decision ------------------------------------------------------------------------


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
) -> Plan:
    """What to do about one job now. Pure: same inputs, same plan. `progress` is the last
    (pod name, GET /progress body) polled from a trainer; `gang` whether the gated workers
    of the current attempt fit on the nodes now (kubetune.gang); `stall` a worker found
    stuck (kubetune.stall.Stall: pod, node, message); `noticed` the nodes under a
    termination notice (kubetune.notices); `init_from` spec.lora.initFrom.adapter resolved
    (kubetune.library.resolve_init_from: {adapter, uri, sha256}, or why it cannot be)."""
    c = Ctx(job, pods, now)
    c.progress = progress
    c.gang = gang
    c.stall = stall
    c.avoid_nodes = tuple(avoid_nodes)
    c.noticed = tuple(noticed)
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
        c.transition(Phase.pending.value, "Created", f"attempt 1 of {spec.workers} worker(s) created")
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


def create_backoff(refusals: int) -> float:
    """Seconds before creating again after the n-th refusal in a row (2, 4, 8, ... 300),
    as the Job controller backs off."""
    return min(2.0 * 2 ** (refusals - 1), CREATE_BACKOFF_MAX_S)


def after_refusal(
    status: dict, code: int, message: str, now: str, gen: int | None, refusals: int
) -> tuple[dict, tuple[str, str, str], float | None]:
    """The status to write when the API server refused a pod or the Service of a new
    attempt, the Event to post, and when to try again (None: never, the job failed). The
    attempt is left not started, so the next reconcile creates its pods again."""
    st = copy.deepcopy(status)
    st.pop("attemptStartTime", None)
    text_ = f"the API server refused to create the attempt's objects: {message}"
    if code in PERMANENT_CREATE_CODES:
        st.update(phase=Phase.failed.value, reason=INVALID_SPEC, message=text_[:1024])
        set_condition(st, FAILED, True, INVALID_SPEC, text_, now, gen)
        set_condition(st, RUNNING, False, INVALID_SPEC, text_, now, gen)
        st.setdefault("completionTime", now)
        return st, ("Warning", FAILED_CREATE, text_[:1024]), None
    delay = create_backoff(refusals)
    text_ = f"{text_} (refused {refusals} time(s) in a row; next try in {delay:.0f} s)"
    st.update(reason=FAILED_CREATE, message=text_[:1024])
    set_condition(st, PODS_CREATED, False, FAILED_CREATE, text_, now, gen)
    return st, ("Warning", FAILED_CREATE, text_[:1024]), delay


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
        c.plan.create += build_pods(
            c.name, c.uid, spec, attempt, st["preemptions"], c.avoid_nodes, count(seen)
        )
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
        return _lost(c, spec, [Loss("failure", c.stall.pod, c.stall.node, STALLED, c.stall.message)])
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
    c.plan.create += build_pods(
        c.name, c.uid, spec, attempt + 1, c.st["preemptions"] + 1, avoid, seen, standby=True
    )
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
    if c.gang is None:  # not checked yet (the handler checks when it sees gated pods)
        c.plan.requeue_after = 1.0
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
            Phase.running.value, "Running", f"attempt {c.st['attempt']}: {workers} worker(s) on {nodes}"
        )
        c.cond(RUNNING, True, "Running", f"attempt {c.st['attempt']} running")


EVALUATION_NUMBERS = ("exactMatchBefore", "exactMatch", "exactMatchUnquantizedBase", "evalLoss")


def evaluation_from_message(message: dict) -> dict | None:
    """status.evaluation from a trainer's termination message: known keys, right types,
    finite numbers only (the message is the trainer's word, not trusted)."""
    ev = message.get("evaluation")
    if not isinstance(ev, dict):
        return None
    out = {}
    if isinstance(ev.get("split"), str):
        out["split"] = ev["split"][:256]
    if isinstance(ev.get("examples"), int) and not isinstance(ev["examples"], bool):
        out["examples"] = ev["examples"]
    for key in EVALUATION_NUMBERS:
        v = ev.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = round(float(v), 4)
    samples = clip_samples(ev.get("samples"))
    if samples:
        out["samples"] = samples
    return out or None


def lineage_from_message(message: dict) -> dict:
    """The trainer's base and data fingerprints (hex) and shard count, checked."""
    found = message.get("lineage")
    if not isinstance(found, dict):
        return {}
    out = {}
    for key in ("base", "data"):
        v = found.get(key)
        if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v):
            out[key] = v
    shards = count(found.get("shards"))
    if shards is not None:
        out["shards"] = shards
    return out


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
    if isinstance(msg.get("adapter"), dict):
        adapter = known(msg["adapter"], {"uri": text, "sha256": lambda v: text(v, 64), "sizeBytes": count})
        if adapter.get("uri"):
            st["adapter"] = adapter
    evaluation = evaluation_from_message(msg)
    if evaluation:
        st["evaluation"] = evaluation
    record_checkpoint(st, msg.get("checkpoint"))
    record_goodput(st, msg)
    step = count(msg.get("step"))
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
            record_checkpoint(st, termination_message(c.pods[loss.pod]).get("checkpoint"))
            record_goodput(st, termination_message(c.pods[loss.pod]))
    worst = next(
        loss for kind in ("permanent", "failure", "preemption") for loss in losses if loss.kind == kind
    )
    where = f" on node {worst.node}" if worst.node else ""
    detail = f"worker {worst.pod}{where}: {worst.reason}" + (f": {worst.message}" if worst.message else "")
    # the next attempt's standby, if a notice started one, is that attempt (a job that
    # fails for good loses it with the rest once finished)
    c.stop_active(spare_attempt=st["attempt"] + 1)
    if worst.kind == "permanent":
        return c.fail(CONFIG_ERROR, f"{detail} (configuration errors are not retried)")
    if worst.kind == "failure":
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
