"""Trainer fixtures: a real MinIO of its own (tests stop and restart it), a tiny random
Llama with a tokenizer trained on the shipped text-to-SQL data, and that data in S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kubetune_dev.devcluster.cluster import repo_pythonpath
from kubetune_dev.devcluster.procs import free_port
from kubetune_trainer.checkpoints import MANIFEST
from tests.helpers import SQL_DATA, tiny_sql_llama


@pytest.fixture(scope="session")
def minio(tmp_path_factory):
    from kubetune_dev.devcluster.minio import MinioServer

    server = MinioServer(tmp_path_factory.mktemp("minio")).start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_sql_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def sql_bucket(minio) -> str:
    """The shipped data in S3, split into more shards than shipped (10 x 200 records)
    so that shard boundaries, shard order and reads during an outage all happen."""
    upload_sql_data(minio)
    return "data"


def upload_sql_data(minio) -> None:
    """The shipped data into bucket "data" (10 train shards and the eval split), and an
    empty bucket "runs"."""
    s3 = minio.client()
    s3.create_bucket(Bucket="data")
    s3.create_bucket(Bucket="runs")
    rows = [
        line
        for shard in sorted((SQL_DATA / "train").glob("*.jsonl"))
        for line in shard.read_text().splitlines()
    ]
    for i in range(10):
        body = "\n".join(rows[i * 200 : (i + 1) * 200]) + "\n"
        s3.put_object(Bucket="data", Key=f"sql/train/part-{i:03d}.jsonl", Body=body.encode())
    s3.put_object(
        Bucket="data", Key="sql/eval/eval.jsonl", Body=(SQL_DATA / "eval" / "eval.jsonl").read_bytes()
    )


def tiny_config(model: Path, run: str, **training) -> dict:
    return {
        "model": {"uri": f"file://{model}"},
        "dataset": {
            "uri": "s3://data/sql/train/",
            "template": "text-to-sql",
            "maxSeqLength": 128,
            "validation": {"uri": "s3://data/sql/eval/"},
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        # not auto: auto probes bf16 against fp32 at start, and on a CPU with AMX that is
        # busy (the dev cluster's builds, other tests) two runs compared with each other
        # can choose differently (seen: an adapter off by 5e-3 between them)
        "quantization": {"computeDtype": "float32"},
        "training": {
            "maxSteps": 40,
            "batchSize": 4,
            "gradientAccumulation": 2,
            "learningRate": 1e-3,
            "loggingSteps": 5,
            **training,
        },
        "checkpoint": {"uri": f"s3://runs/{run}/ckpt/", "everySteps": 10, "keep": 3, "everyMinutes": None},
        "output": {"uri": f"s3://runs/{run}/out/"},
    }


@dataclass
class TrainerRun:
    """A real trainer process (python -m kubetune_trainer) and what it leaves behind."""

    workdir: Path
    proc: subprocess.Popen
    log: Path
    trace: Path
    termination: Path
    env: dict = field(repr=False, default_factory=dict)

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout)

    def steps(self) -> list[dict]:
        if not self.trace.exists():
            return []
        return [json.loads(line) for line in self.trace.read_text().splitlines() if line.strip()]

    def last_step(self) -> int:
        s = self.steps()
        return s[-1]["step"] if s else 0

    def termination_message(self) -> dict:
        return json.loads(self.termination.read_text())

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def watch(self) -> tuple:
        """For wait_for(procs=...): fail fast, with the log, if the trainer exits."""
        return ("trainer", self.proc, self.log)

    def log_text(self) -> str:
        return self.log.read_text()


def start_trainer(
    config: dict,
    workdir: Path,
    minio,
    name: str,
    extra_env: dict | None = None,
    module: str = "kubetune_trainer",
    python: str = sys.executable,
) -> TrainerRun:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{name}.json"
    cfg_path.write_text(json.dumps(config))
    trace, term, log = workdir / f"{name}.trace", workdir / f"{name}.termination", workdir / f"{name}.log"
    for p in (trace, term):
        p.unlink(missing_ok=True)
    env = {
        **os.environ,
        **minio.env(),
        "PYTHONPATH": repo_pythonpath(),
        "KUBETUNE_SAMPLE_TRACE": str(trace),
        "KUBETUNE_TERMINATION_LOG": str(term),
        "KUBETUNE_PROGRESS_PORT": str(free_port()),
        "KUBETUNE_BACKEND": "cpu",
        "OMP_NUM_THREADS": "1",  # same summation order in every run
        **(extra_env or {}),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                python,
                "-m",
                module,
                str(cfg_path),
                "--workdir",
                str(workdir / f"{name}-work"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return TrainerRun(workdir, proc, log, trace, term, env)


def run_trainer(config: dict, workdir: Path, minio, name: str, timeout: float = 300, **kw) -> TrainerRun:
    run = start_trainer(config, workdir, minio, name, **kw)
    code = run.wait(timeout)
    assert code == 0, f"trainer {name} exited {code}:\n{run.log_text()[-4000:]}"
    return run


def adapter_tensors(minio, uri: str) -> dict:
    """The adapter_model.safetensors under an s3:// output or checkpoint prefix."""
    from safetensors.torch import load

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    body = minio.client().get_object(Bucket=bucket, Key=prefix.rstrip("/") + "/adapter_model.safetensors")
    return load(body["Body"].read())


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def committed_steps(s3, prefix: str) -> list[int]:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix=prefix).get("Contents", [])]
    return sorted({int(k.split("step-")[1][:8]) for k in keys if k.endswith("/" + MANIFEST)})


def post_checkpoint(
    run, token: str | None, reason: str = "test", path: str = "/checkpoint"
) -> tuple[int, dict]:
    """POST /checkpoint to a trainer, as the operator does on a node's termination notice
    (or another control path: /start, a standby's go)."""
    port = run.env["KUBETUNE_PROGRESS_PORT"]
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps({"reason": reason}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
