"""A create the API server refused: the Job controller's way with it (exponential backoff,
Failed/InvalidSpec when the objects themselves are invalid)."""

from __future__ import annotations

import copy

from kubetune.api import Phase
from kubetune.decision.conditions import (
    FAILED,
    FAILED_CREATE,
    INVALID_SPEC,
    PODS_CREATED,
    RUNNING,
    set_condition,
)

# 400 Bad Request, 422 Invalid: the objects themselves are wrong, and a retry never helps.
# Anything else (403 from a quota, a missing ServiceAccount or PriorityClass) may pass later.
PERMANENT_CREATE_CODES = (400, 422)

CREATE_BACKOFF_MAX_S = 300.0


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
