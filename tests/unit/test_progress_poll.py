"""The operator's progress requests: one total deadline per request (a trainer that
trickles bytes cannot hold a fetcher), bounded size, and rounds that never wait for a
slow pod. Real sockets on loopback, servers in threads."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

from kubetune.runtime import ProgressPoller
from kubetune.trainer_client import fetch_progress
from tests.helpers import wait_for


class Server:
    """A TCP server on loopback answering every connection with `respond(conn)`."""

    def __init__(self, respond) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.respond, self.stopping = respond, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn) -> None:
        with conn:
            conn.recv(4096)
            with contextlib.suppress(OSError):  # the client hung up
                self.respond(conn, self.stopping)

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()


def ok(body: bytes):
    def respond(conn, _):
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body)

    return respond


def trickle(conn, stopping):
    """A byte every 0.3 s for up to a minute: each read returns in time, the whole never."""
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n{")
    for _ in range(200):
        if stopping.wait(0.3):
            return
        conn.sendall(b" ")


@pytest.fixture
def servers():
    made = []
    yield lambda respond: made.append(Server(respond)) or made[-1]
    for s in made:
        s.close()


def test_an_answer_is_read_and_anything_else_is_none(servers):
    good = servers(ok(b'{"step": 3, "loss": NaN}'))
    body = fetch_progress("127.0.0.1", good.port)
    assert body["step"] == 3 and body["loss"] != body["loss"]  # NaN reaches the status code, which drops it
    for respond in (
        ok(b"[1, 2]"),
        ok(b"not json"),
        ok(b'{"pad": "' + b"x" * 70_000 + b'"}'),
        lambda conn, _: conn.sendall(b"HTTP/1.0 500 Oops\r\n\r\n{}"),
    ):
        assert fetch_progress("127.0.0.1", servers(respond).port) is None
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert fetch_progress("127.0.0.1", port) is None


def test_a_trickling_trainer_is_cut_off_at_the_deadline(servers):
    slow = servers(trickle)
    t0 = time.monotonic()
    assert fetch_progress("127.0.0.1", slow.port, deadline_s=1.0) is None
    # per-read timeouts would have kept reading for a minute
    assert time.monotonic() - t0 < 10


def test_a_round_never_waits_for_a_slow_pod(servers):
    slow, fast = servers(trickle), servers(ok(json.dumps({"step": 7}).encode()))
    seen = []
    fetch = {"slow": slow.port, "fast": fast.port}

    poller = ProgressPoller(
        interval_s=0.1,
        fetch=lambda name: fetch_progress("127.0.0.1", fetch[name], deadline_s=30),
        changed=lambda key, name, body: seen.append((name, body["step"])),
    )
    try:
        targets = [("job-slow", "slow", "slow"), ("job-fast", "fast", "fast")]
        assert poller.tick(targets, time.monotonic()) == ["slow", "fast"]
        wait_for(lambda: ("fast", 7) in seen, 10, "the fast pod's progress")
        # the slow request is still in flight: the next round asks the fast pod again, not it
        assert not poller.in_flight["slow"].done()
        assert poller.tick(targets, time.monotonic()) == ["fast"]
    finally:
        slow.close()
        poller.close()
