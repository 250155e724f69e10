"""S3 faults, for real: a connection cut in the middle of an object body (through a TCP
proxy in front of MinIO), a MinIO that is away for 20 s while a trainer runs, and a
checkpoint upload S3 refuses until botocore gives up."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

import pytest

from kubetune_trainer.storage import S3Store, s3_client
from tests.helpers import wait_for
from tests.trainer.conftest import committed_steps, post_checkpoint, start_trainer, tiny_config

pytestmark = pytest.mark.tools


class LoopbackProxy:
    """A TCP server on loopback in front of MinIO that serves each connection on its own
    thread (_serve, in the subclasses)."""

    def __init__(self, upstream_port: int, target: str) -> None:
        self.upstream_port, self.target = upstream_port, target.encode()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError


class CuttingProxy(LoopbackProxy):
    """Forwards TCP to MinIO; cuts the first response that carries the target object
    after `cut_after` body bytes, and records every request's first lines."""

    def __init__(self, upstream_port: int, target: str, cut_after: int) -> None:
        self.cut_after = cut_after
        self.requests: list[bytes] = []
        self.cuts = 0
        super().__init__(upstream_port, target)

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        request = client.recv(65536)
        self.requests.append(request)
        cut = self.target in request.split(b"\r\n", 1)[0] and self.cuts == 0
        if cut:
            self.cuts += 1
        upstream.sendall(request)
        threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        sent = 0
        while data := upstream.recv(16384):
            if cut and sent + len(data) > self.cut_after:
                client.sendall(data[: self.cut_after - sent])
                break  # drop the connection mid-body
            client.sendall(data)
            sent += len(data)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # a FIN now, whatever other threads hold
            s.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def test_a_body_cut_mid_stream_is_resumed_at_its_byte_offset(minio, monkeypatch):
    payload = os.urandom(3 << 20)
    s3 = minio.client()
    s3.create_bucket(Bucket="cut")
    s3.put_object(Bucket="cut", Key="big.bin", Body=payload)
    proxy = CuttingProxy(minio.port, "/cut/big.bin", cut_after=1 << 20)
    for k, v in {**minio.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}.items():
        monkeypatch.setenv(k, v)
    try:
        store = S3Store("cut", "", s3_client())
        with store.open("big.bin") as f:
            got = f.read()
    finally:
        proxy.close()
    assert got == payload
    assert proxy.cuts == 1
    ranges = [r for r in proxy.requests if b"/cut/big.bin" in r.split(b"\r\n", 1)[0]]
    assert len(ranges) == 2, "one reopen after the cut"
    header = next(line for line in ranges[1].split(b"\r\n") if line.lower().startswith(b"range:"))
    offset = int(header.split(b"=")[1].split(b"-")[0])
    # resumed after what had been read, not from 0 (a read cut mid-call discards its partial
    # chunk, so the offset may sit a buffer below the cut)
    assert 512 << 10 <= offset <= 1 << 20


@pytest.mark.slow
def test_training_survives_s3_being_down_for_20_seconds(minio, sql_bucket, tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, "outage", maxSteps=60)
    cfg["checkpoint"]["everySteps"] = 2
    cfg["dataset"]["maxSeqLength"] = 512  # more records per step: shards are opened all along
    run = start_trainer(cfg, tmp_path, minio, "outage")
    wait_for(lambda: run.last_step() >= 4, 120, "step 4", procs=[run.watch()])
    minio.stop()
    down_at = run.last_step()
    try:
        time.sleep(20)  # the outage itself: nothing to wait for
    finally:
        minio.start()
    assert run.wait(300) == 0, run.log_text()[-3000:]
    assert run.last_step() == 60
    assert down_at < 60, "the outage must happen mid-training"
    keys = [o["Key"] for o in minio.client().list_objects_v2(Bucket="runs", Prefix="outage/out/")["Contents"]]
    assert "outage/out/adapter_model.safetensors" in keys


class RefusingProxy(LoopbackProxy):
    """Forwards TCP to MinIO one request per connection (it asks MinIO to close after its
    answer, so every request is seen); answers 503 to each whose request line holds
    `target`, as an overloaded or failing S3 does, and counts them."""

    REFUSAL = b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self, upstream_port: int, target: str) -> None:
        self.refused = 0
        super().__init__(upstream_port, target)

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = client.recv(65536)
            if self.target in head.split(b"\r\n", 1)[0]:
                self.refused += 1
                with contextlib.suppress(OSError):
                    client.sendall(self.REFUSAL)
                return
            line, _, rest = head.partition(b"\r\n")
            head = line + b"\r\nConnection: close\r\n" + rest
            with socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
                upstream.sendall(head)
                threading.Thread(target=CuttingProxy._pipe, args=(client, upstream), daemon=True).start()
                CuttingProxy._pipe(upstream, client)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
@pytest.mark.parametrize("then", ["sigterm", "request"])
def test_a_checkpoint_upload_s3_refused_is_saved_again_by_the_stop_or_request_after_it(
    then, minio, sql_bucket, tiny_model, tmp_path
):
    """The periodic upload of step 50 fails for good (every attempt refused); training goes
    on. The SIGTERM, or the checkpoint request, that comes before the next periodic one must
    find that upload failed, save its own step and commit it; not crash on the old failure,
    nor count step 50 as saved."""
    run_name = f"refused-{then}"
    proxy = RefusingProxy(minio.port, f"/runs/{run_name}/ckpt/step-00000050/")
    token = "t0ken-refused"
    cfg = tiny_config(tiny_model, run_name, maxSteps=400)
    cfg["checkpoint"]["everySteps"] = 50
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
        "KUBETUNE_S3_MAX_ATTEMPTS": "2",  # botocore gives up in about a second
        "KUBETUNE_CONTROL_TOKEN": token,
    }
    try:
        run = start_trainer(cfg, tmp_path, minio, run_name, extra_env=env)
        wait_for(lambda: proxy.refused >= 1, 180, "the refused upload of step 50", procs=[run.watch()])
        if then == "request":
            assert post_checkpoint(run, token)[0] == 202
            wait_for(
                lambda: [s for s in committed_steps(minio.client(), f"{run_name}/ckpt/") if s > 50],
                60,
                "the requested checkpoint",
                procs=[run.watch()],
            )
        run.signal(signal.SIGTERM)
        assert run.wait(120) == 75, run.log_text()[-3000:]
    finally:
        proxy.close()
    log = run.log_text()
    assert "a checkpoint upload failed" in log and "Traceback" not in log, log[-3000:]
    stopped = run.termination_message()["checkpoint"]["step"]
    committed = committed_steps(minio.client(), f"{run_name}/ckpt/")
    assert 50 < stopped < 100 and stopped == run.last_step() and committed[-1] == stopped, (
        stopped,
        committed,
    )
    assert 50 not in committed and proxy.refused >= 2


@pytest.fixture(autouse=True)
def _minio_back_up(minio):
    yield
    if minio.proc is None:
        minio.start()
