"""Reading a FineTuneJob's pods: attempt, rank and phase from their labels and status, the
trainer's termination message, and why a worker of the current attempt is gone (LossKind)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from kubetune.api import Phase
from kubetune.decision.conditions import CONFIG_ERROR
from kubetune.decision.reports import text
from kubetune.manifests import ATTEMPT_LABEL, RANK_LABEL
from kubetune_trainer import contract


class LossKind(enum.StrEnum):
    PREEMPTION = "preemption"  # infrastructure took the worker: not charged to backoffLimit
    FAILURE = "failure"  # the application failed: charged
    PERMANENT = "permanent"  # a configuration error the trainer reported: never retried


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
    kind: LossKind
    pod: str
    node: str | None
    reason: str
    message: str


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
        return Loss(LossKind.PREEMPTION, name, None, "PodDeleted", "the pod was deleted")
    node = pod["spec"].get("nodeName")
    # the kubelet's, the Eviction API's and the taint manager's; Kueue's own when it
    # preempts a pod group (TerminationTarget)
    disruption = condition(pod, "DisruptionTarget") or condition(pod, "TerminationTarget")
    if disruption and disruption.get("status") == "True":
        return Loss(
            LossKind.PREEMPTION,
            name,
            node,
            disruption.get("reason") or "DisruptionTarget",
            disruption.get("message") or "",
        )
    status = pod.get("status") or {}
    if status.get("reason") in PREEMPTION_POD_REASONS:
        return Loss(LossKind.PREEMPTION, name, node, status["reason"], status.get("message") or "")
    term = terminated(pod) or {}
    code = term.get("exitCode")
    summary = text(termination_message(pod).get(contract.ERROR)) or text(term.get("message")) or ""
    if code == contract.EXIT_PREEMPTED:
        return Loss(
            LossKind.PREEMPTION, name, node, "StoppedForPreemption", "the trainer checkpointed and stopped"
        )
    if pod["metadata"].get("deletionTimestamp") and code in (137, 143):
        return Loss(
            LossKind.PREEMPTION, name, node, "PodDeleted", f"killed while being deleted (exit {code})"
        )
    if term.get("reason") == "OOMKilled":
        return Loss(
            LossKind.FAILURE,
            name,
            node,
            "OOMKilled",
            "out of memory: raise resources.memory, or lower training.batchSize or dataset.maxSeqLength, "
            "or enable training.gradientCheckpointing",
        )
    if contract.is_permanent(code):
        return Loss(LossKind.PERMANENT, name, node, CONFIG_ERROR, summary or f"exit code {code}")
    return Loss(LossKind.FAILURE, name, node, "Error", summary or f"exit code {code}")


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
