"""Every pod's first trainer process serves GET /progress (JSON) and GET /metrics
(Prometheus) on the port named `metrics`. Rank 0's /progress is what the operator folds
into status.progress; every rank's says which step it is at, how long its steps take and
whether it is reading data or computing, so that a rank that stalls can be told apart.

What happens per optimizer step or micro-batch (step_begins, set_activity, step_done)
costs a lock and a few attribute sets: /progress does the arithmetic when asked."""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import json
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

STEP_WINDOW = 20  # stepSeconds: the mean over this many recent optimizer steps


@dataclass
class Progress:
    phase: str = "starting"  # starting, loading, training, evaluating, checkpointing, uploading, done
    rank: int = 0
    # in the training loop: "data" while this rank reads its next micro-batches from the
    # dataset stream, "compute" otherwise (forward/backward, collectives, optimizer)
    activity: str | None = None
    step: int = 0  # optimizer steps done, updated every step
    step_seconds: float | None = None  # mean wall seconds of the recent steps
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    resumed_from_step: int | None = None
    last_checkpoint_step: int | None = None  # committed: a reader would find it
    last_checkpoint: dict | None = None  # {"step", "uri", "time"} of that checkpoint
    updated_at: str = ""
    goodput: dict | None = None  # kubetune_trainer.goodput's report, when training

    def to_json(self) -> dict:
        d = asdict(self)
        # camelCase, as everything the operator reads
        return {
            "".join(w.capitalize() if i else w for i, w in enumerate(k.split("_"))): v for k, v in d.items()
        }


def eta_seconds(step: int, total: int, start_step: int, elapsed_s: float) -> float | None:
    """From the rate of this attempt's own steps (a resumed run's earlier steps cost nothing)."""
    done = step - start_step
    if done <= 0 or elapsed_s <= 0:
        return None
    return (total - step) * elapsed_s / done


def progress_port_for(port: int | None, local_rank: int) -> int | None:
    """Where this process serves /progress: each pod's first process (LOCAL_RANK 0) on the
    pod's port, at the pod's address. A pod runs one rank, or, with several GPUs, one
    process per GPU (kubetune_trainer.launch): those others share the pod's one port, so
    they do not serve (the first process speaks for the pod, as its termination message does)."""
    return port if local_rank == 0 else None


MAX_CONTROL_BODY = 4096


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an Authorization header carries the bearer token (compared in constant
    time). No token configured: nobody is."""
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())


def request_reason(body: bytes) -> str:
    """The reason a checkpoint request gives ({"reason": "..."}), printable and short:
    it goes into the trainer's log."""
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return "requested"
    reason = doc.get("reason") if isinstance(doc, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        return "requested"
    return "".join(ch if ch.isprintable() else "?" for ch in reason)[:200]


class ProgressServer:
    """GET /progress and /metrics for anyone who reaches the port; POST /checkpoint (a
    checkpoint now, at the next step boundary) and, for a standby, POST /start (resume
    now) only with the pod's bearer token, which the operator set in its environment."""

    def __init__(
        self,
        port: int | None,
        host: str = "0.0.0.0",
        rank: int = 0,
        clock=time.monotonic,
        control_token: str | None = None,
        checkpoint_request=None,
        start_signal=None,
    ) -> None:
        self.progress = Progress(rank=rank)
        self.control_token = control_token
        self.checkpoint_request = checkpoint_request  # signals.CheckpointRequest
        self.start_signal = start_signal  # signals.StartSignal: a standby's go
        self.goodput_source = None  # () -> dict, set by the trainer once it trains
        self.lock = threading.Lock()
        self.clock = clock
        self.step_durations: deque[float] = deque(maxlen=STEP_WINDOW)
        self.step_started: float | None = None
        self.updated: float | None = None  # time.time() of the last change
        self.registry = CollectorRegistry()
        self.g_step = Gauge("kubetune_trainer_step", "Optimizer steps done", registry=self.registry)
        self.g_total = Gauge(
            "kubetune_trainer_total_steps", "Optimizer steps planned", registry=self.registry
        )
        self.g_loss = Gauge(
            "kubetune_trainer_loss", "Training loss (last logging window)", registry=self.registry
        )
        self.g_eval = Gauge("kubetune_trainer_eval_loss", "Validation loss", registry=self.registry)
        self.g_tps = Gauge("kubetune_trainer_tokens_per_second", "Training tokens/s", registry=self.registry)
        self.c_tokens = Counter(
            "kubetune_trainer_tokens", "Training tokens processed", registry=self.registry
        )
        self.c_ckpt = Counter("kubetune_trainer_checkpoints", "Checkpoints committed", registry=self.registry)
        self.server = None
        if port is not None:
            self.server = QuietServer((host, port), self._handler())
            threading.Thread(target=self.server.serve_forever, daemon=True, name="progress").start()

    @property
    def port(self) -> int | None:
        return self.server.server_address[1] if self.server else None

    def update(self, **fields) -> None:
        with self.lock:
            for k, v in fields.items():
                setattr(self.progress, k, v)
            self.updated = time.time()
            p = self.progress
        self.g_step.set(p.step)
        self.g_total.set(p.total_steps)
        if p.loss is not None:
            self.g_loss.set(p.loss)
        if p.eval_loss is not None:
            self.g_eval.set(p.eval_loss)
        if p.tokens_per_second is not None:
            self.g_tps.set(p.tokens_per_second)

    # -- per step and micro-batch: cheap ------------------------------------------------
    def step_begins(self) -> None:
        """An optimizer step starts: its wall time counts from here to step_done."""
        self.step_started = self.clock()

    def set_activity(self, activity: str | None) -> None:
        """ "data" or "compute" (None: outside the training loop). One attribute set: a
        str is swapped whole, so a reader sees the old value or the new one."""
        self.progress.activity = activity

    def step_done(self, step: int) -> float | None:
        """Optimizer step `step` is done (every step; loss and rates stay update()'s).
        Returns its wall seconds since step_begins (None without one)."""
        now = self.clock()
        seconds = None
        with self.lock:
            if self.step_started is not None:
                seconds = now - self.step_started
                self.step_durations.append(seconds)
            self.step_started = now  # without a step_begins, the next step counts from here
            self.progress.step = step
            self.updated = time.time()
        self.g_step.set(step)
        return seconds

    @contextlib.contextmanager
    def phase_while(self, phase: str):
        """`phase` for the duration of the block, then the phase from before it."""
        with self.lock:
            before = self.progress.phase
        self.update(phase=phase)
        try:
            yield
        finally:
            self.update(phase=before)

    def snapshot(self) -> dict:
        with self.lock:
            durations = self.step_durations
            self.progress.step_seconds = round(sum(durations) / len(durations), 4) if durations else None
            if self.updated is not None:
                when = dt.datetime.fromtimestamp(self.updated, dt.UTC)
                self.progress.updated_at = when.strftime("%Y-%m-%dT%H:%M:%SZ")
            source = self.goodput_source
            self.progress.goodput = source() if source else None
            return self.progress.to_json()

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] == "/progress":
                    body, ctype = json.dumps(outer.snapshot()).encode(), "application/json"
                elif self.path.split("?")[0] == "/metrics":
                    body, ctype = generate_latest(outer.registry), CONTENT_TYPE_LATEST
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                path = self.path.split("?")[0]
                target = {"/checkpoint": outer.checkpoint_request, "/start": outer.start_signal}.get(path)
                if target is None:
                    self.send_error(404)
                    return
                if not authorized(self.headers.get("Authorization"), outer.control_token):
                    self.send_error(401)
                    return
                try:
                    length = min(int(self.headers.get("Content-Length") or 0), MAX_CONTROL_BODY)
                except ValueError:
                    length = 0
                reason = request_reason(self.rfile.read(length) if length > 0 else b"")
                if path == "/start":
                    body = json.dumps({"accepted": True, "again": not target.go()}).encode()
                else:
                    new = target.ask(reason)
                    with outer.lock:
                        step = outer.progress.step
                    body = json.dumps({"accepted": True, "coalesced": not new, "step": step}).encode()
                self.send_response(202)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # no access log on stderr
                pass

        return Handler

    def close(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


class QuietServer(ThreadingHTTPServer):
    """A client that gave up before the answer (the operator's poll has a 2 s deadline, and a
    trainer loading its model may take longer to answer) is no error worth a traceback in
    the trainer's log: under load those filled it."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)


class Rate:
    """Tokens/s over the recent window."""

    def __init__(self) -> None:
        self.t0, self.tokens = time.monotonic(), 0

    def add(self, n: int) -> None:
        self.tokens += n

    def take(self) -> float:
        now = time.monotonic()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate
