"""Status vocabulary and writes: condition types and reasons (CamelCase constants, as
Kubernetes has them), conditions with Kubernetes' transition semantics, timestamps, and
the RFC 7386 merge patch a status write sends."""

from __future__ import annotations

import datetime as dt

# Condition types and reasons.
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

PODS_CREATED = "PodsCreated"  # a condition only once a create was refused

WAITING_FOR_ADAPTER = "WaitingForAdapter"


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None


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
