"""Rank 0 serves GET /progress (JSON, polled by the operator into status.progress) and
GET /metrics (Prometheus) on the port named `metrics`."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest


@dataclass
class Progress:
    phase: str = "starting"  # starting, loading, training, checkpointing, uploading, done
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    resumed_from_step: int | None = None
    last_checkpoint_step: int | None = None
    updated_at: str = ""

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


class ProgressServer:
    def __init__(self, port: int | None, host: str = "0.0.0.0") -> None:
        self.progress = Progress()
        self.lock = threading.Lock()
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
            self.server = ThreadingHTTPServer((host, port), self._handler())
            self.server.daemon_threads = True
            threading.Thread(target=self.server.serve_forever, daemon=True, name="progress").start()

    @property
    def port(self) -> int | None:
        return self.server.server_address[1] if self.server else None

    def update(self, **fields) -> None:
        with self.lock:
            for k, v in fields.items():
                setattr(self.progress, k, v)
            self.progress.updated_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            p = self.progress
        self.g_step.set(p.step)
        self.g_total.set(p.total_steps)
        if p.loss is not None:
            self.g_loss.set(p.loss)
        if p.eval_loss is not None:
            self.g_eval.set(p.eval_loss)
        if p.tokens_per_second is not None:
            self.g_tps.set(p.tokens_per_second)

    def snapshot(self) -> dict:
        with self.lock:
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

            def log_message(self, *args):  # no access log on stderr
                pass

        return Handler

    def close(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


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
