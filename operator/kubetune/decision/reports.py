"""What a trainer reports (its /progress body, its termination message) made fit for status:
the trainer's word is not trusted, so only known keys of the expected types, finite and
in range, get through; and progress formatted for people (summary, ETA)."""

from __future__ import annotations

import math
import re

from kubetune_trainer import contract
from kubetune_trainer.library import clip_samples

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
    goodput = goodput_from_trainer(source.get(contract.GOODPUT))
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


EVALUATION_NUMBERS = ("exactMatchBefore", "exactMatch", "exactMatchUnquantizedBase", "evalLoss")


def evaluation_from_message(message: dict) -> dict | None:
    """status.evaluation from a trainer's termination message: known keys, right types,
    finite numbers only (the message is the trainer's word, not trusted)."""
    ev = message.get(contract.EVALUATION)
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
    found = message.get(contract.LINEAGE)
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
