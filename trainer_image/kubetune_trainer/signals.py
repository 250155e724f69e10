"""The trainer's side of the operator contract (kubetune_trainer.contract): SIGTERM → stop
at the next step boundary; the JSON termination message; secrets scrubbed from anything
written out."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

from kubetune_trainer.contract import CONTROL_TOKEN_ENV, MAX_MESSAGE, message_body

TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    CONTROL_TOKEN_ENV,
)


class StartSignal:
    """A standby trainer's go: the operator started it on other capacity while the attempt
    it stands in for still ran (a node's termination notice), and sends POST /start once
    that attempt has stopped and its last checkpoint is committed. Until then the standby
    has loaded its model and holds nothing else: it must not claim the checkpoint prefix
    the running attempt still writes."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at: float | None = None  # time.time() of the go

    def go(self) -> bool:
        """True the first time; later ones change nothing."""
        if self.event.is_set():
            return False
        self.at = time.time()
        self.event.set()
        return True

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it at step boundaries."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C at a terminal means now
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()


class CheckpointRequest:
    """A checkpoint asked for from outside (the operator, on a node's termination notice):
    taken at the next step boundary while training goes on. A request while one is
    pending, or while the checkpoint it asked for is still uploading, is coalesced into
    it: a notice repeated every poll makes one checkpoint, not one per poll."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending = False
        self.reason = ""
        self.in_flight = False  # taken, and its checkpoint not committed yet
        self.coalesced = 0

    def ask(self, reason: str) -> bool:
        """True: a new request; False: coalesced into one pending or in flight."""
        with self.lock:
            if self.pending or self.in_flight:
                self.coalesced += 1
                return False
            self.pending, self.reason = True, reason
            return True

    def take(self) -> str | None:
        """The pending request's reason, or None; a request taken stays in flight (later
        ones are coalesced into it) until done()."""
        with self.lock:
            if not self.pending:
                return None
            self.pending, self.in_flight = False, True
            return self.reason

    def done(self) -> None:
        """The requested checkpoint is committed (or there was nothing new to save)."""
        with self.lock:
            self.in_flight = False

    def __bool__(self) -> bool:
        return self.pending


def secrets(environ=os.environ) -> list[str]:
    return [v for k in SECRET_ENV if len(v := environ.get(k, "")) >= 4]


def redact(text: str, environ=os.environ) -> str:
    for value in secrets(environ):
        text = text.replace(value, "***")
    return text


class RedactingFilter(logging.Filter):
    """Last line of defence: no log record carries a credential's value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if secrets():
            record.msg = redact(record.getMessage())
            record.args = ()
        return True


def scrub(value, environ=os.environ):
    """Every string inside value (dicts, lists) with credentials replaced; a NaN or an
    infinity (a loss that diverged) as null, which JSON can say."""
    if isinstance(value, str):
        return redact(value, environ)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: scrub(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, environ) for v in value]
    return value


def termination_message(outcome: str, environ=os.environ, **fields) -> str:
    """JSON within the kubelet's 4096 bytes, credentials scrubbed. Scrubbed first, cut
    second: cutting first could split a secret, and the part left would no longer match
    (a 40-character key once showed 39 of its characters)."""
    body = scrub(message_body(outcome, **fields), environ)

    def dump(b: dict) -> str:
        return json.dumps(b, separators=(",", ":"), allow_nan=False, default=str)

    text = dump(body)
    error = body.get("error")
    if len(text.encode()) > MAX_MESSAGE and isinstance(error, str):
        # the longest head of the error that fits (escapes make bytes and characters differ)
        lo, hi = 0, len(error)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(dump({**body, "error": error[:mid] + "…"}).encode()) <= MAX_MESSAGE:
                lo = mid
            else:
                hi = mid - 1
        text = dump({**body, "error": error[:lo] + "…"})
    if len(text.encode()) > MAX_MESSAGE:  # something other than the error is that large
        text = json.dumps({"outcome": outcome, "error": "termination message too large"})
    return text


def write_termination_message(text: str, environ=os.environ) -> Path | None:
    if int(environ.get("LOCAL_RANK", 0)) != 0:
        return None  # one message per pod: its first process's (kubetune_trainer.launch)
    path = Path(environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG))
    try:
        if path.parent.is_dir() and (path.exists() or TERMINATION_LOG_ENV in environ):
            path.write_text(text)
            return path
    except OSError:
        pass
    return None
