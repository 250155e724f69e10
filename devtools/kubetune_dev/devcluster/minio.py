"""A real MinIO server on a free local port: part of the dev cluster, and on its own for
trainer tests and benchmarks (which stop and restart it to play an S3 outage)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from kubetune_dev.devcluster import procs
from kubetune_dev.devcluster.tools import http_ok, tool_binary

S3_REGION = "us-east-1"


def minio_command(
    binary: Path, port: int, console_port: int, data: Path, host: str = "127.0.0.1"
) -> list[str]:
    return [
        str(binary),
        "server",
        "--quiet",
        "--address",
        f"{host}:{port}",
        "--console-address",
        f"127.0.0.1:{console_port}",
        str(data),
    ]


def minio_env(home: Path, access_key: str, secret_key: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "MINIO_ROOT_USER": access_key,
        "MINIO_ROOT_PASSWORD": secret_key,
        "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off",
    }


def s3_client(endpoint: str, access_key: str, secret_key: str):
    """A boto3 client for a local MinIO (tests, benchmarks, the demo)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=S3_REGION,
    )


def upload_tree(s3, bucket: str, prefix: str, folder: Path) -> int:
    """Every file under folder (but hidden ones, like .complete markers) to bucket/prefix/."""
    n = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        n += 1
    return n


class MinioServer:
    """start() / stop() / start() again keeps the port, keys and data: a restart is an
    outage as a client sees it, not a new server."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.binary = tool_binary("minio")
        self.port, self.console_port = procs.free_port(), procs.free_port()
        self.access_key, self.secret_key = "kubetune-" + secrets.token_hex(4), secrets.token_urlsafe(24)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (boto3, the trainer) reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": S3_REGION,
        }

    def client(self):
        return s3_client(self.endpoint, self.access_key, self.secret_key)

    def start(self, timeout_s: float = 60) -> MinioServer:
        self.proc = procs.spawn(
            minio_command(self.binary, self.port, self.console_port, self.workdir / "data"),
            self.workdir / "minio.log",
            env=minio_env(self.workdir, self.access_key, self.secret_key),
        )
        procs.wait_for(
            lambda: http_ok(f"{self.endpoint}/minio/health/ready"),
            timeout_s,
            "MinIO ready",
            procs=[("minio", self.proc, self.workdir / "minio.log")],
        )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop_group(self.proc)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir / "data", ignore_errors=True)

    def __enter__(self) -> MinioServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
