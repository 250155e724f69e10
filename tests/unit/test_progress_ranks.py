"""Every rank's /progress: which rank it is, whether it reads data or computes, the step
it is at (every optimizer step) and how long its recent steps took, so the operator can
tell a stalled rank from a slow job; and where each process serves it."""

from __future__ import annotations

import json
import socket
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest

from kubetune_trainer.__main__ import start_progress
from kubetune_trainer.progress import STEP_WINDOW, ProgressServer, progress_port_for


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read()


def test_the_body_names_the_rank_its_activity_and_step_time():
    body = ProgressServer(None, rank=3).snapshot()
    assert body["rank"] == 3
    assert body["activity"] is None and body["stepSeconds"] is None and body["step"] == 0
    assert body["phase"] == "starting" and body["updatedAt"] == ""
    # what the operator already reads is still there, camelCase
    assert {"totalSteps", "loss", "evalLoss", "tokensPerSecond", "etaSeconds", "lastCheckpointStep"} <= set(
        body
    )


def test_step_seconds_is_none_before_a_step_then_the_mean_of_the_recent_steps():
    clock = Clock()
    p = ProgressServer(None, clock=clock)
    p.step_begins()
    assert p.snapshot()["stepSeconds"] is None  # a step begun is not a step done
    for step, seconds in enumerate([2.0, 4.0, 3.0], start=1):
        clock.now += 10.0  # between steps (an evaluation, a checkpoint): not a step's time
        p.step_begins()
        clock.now += seconds
        p.step_done(step)
    body = p.snapshot()
    assert body["step"] == 3 and body["stepSeconds"] == pytest.approx(3.0)
    assert body["updatedAt"] != ""
    # only the recent window counts: a slowdown shows within STEP_WINDOW steps
    for step in range(4, 4 + STEP_WINDOW):
        p.step_begins()
        clock.now += 30.0
        p.step_done(step)
    assert p.snapshot()["stepSeconds"] == pytest.approx(30.0)


def test_without_step_begins_a_step_counts_from_the_previous_one():
    clock = Clock()
    p = ProgressServer(None, clock=clock)
    p.step_done(1)  # the first: nothing to count from
    assert p.snapshot()["stepSeconds"] is None
    clock.now += 1.5
    p.step_done(2)
    clock.now += 2.5
    p.step_done(3)
    assert p.snapshot()["stepSeconds"] == pytest.approx(2.0)


def test_step_done_moves_the_step_and_leaves_the_logged_fields_alone():
    p = ProgressServer(None)
    p.update(phase="training", step=5, loss=1.25, learning_rate=1e-3, tokens_per_second=100.0)
    p.step_done(6)
    p.step_done(7)
    body = p.snapshot()
    assert body["step"] == 7 and body["loss"] == 1.25 and body["tokensPerSecond"] == 100.0
    assert p.g_step._value.get() == 7  # the step gauge follows every step


def test_activity_is_data_or_compute_and_none_outside_the_loop():
    p = ProgressServer(None)
    seen = []
    for activity in ("data", "compute", "data", None):
        p.set_activity(activity)
        seen.append(p.snapshot()["activity"])
    assert seen == ["data", "compute", "data", None]


def test_phase_while_restores_the_phase_from_before_even_on_error():
    p = ProgressServer(None)
    p.update(phase="training")
    with p.phase_while("evaluating"):
        assert p.snapshot()["phase"] == "evaluating"
    assert p.snapshot()["phase"] == "training"
    with pytest.raises(RuntimeError), p.phase_while("checkpointing"):
        raise RuntimeError("boom")
    assert p.snapshot()["phase"] == "training"


def test_a_started_server_answers_progress_and_metrics_over_http():
    clock = Clock()
    p = ProgressServer(0, "127.0.0.1", rank=2, clock=clock)
    try:
        p.update(phase="training", total_steps=50, activity="compute")
        for step in (1, 2):
            p.step_begins()
            clock.now += 0.5
            p.step_done(step)
        p.set_activity("data")
        body = json.loads(get(p.port, "/progress"))
        assert body["rank"] == 2 and body["activity"] == "data" and body["step"] == 2
        assert body["stepSeconds"] == pytest.approx(0.5) and body["phase"] == "training"
        metrics = get(p.port, "/metrics").decode()
        assert "kubetune_trainer_step 2.0" in metrics and "kubetune_trainer_total_steps 50.0" in metrics
    finally:
        p.close()


def test_each_pods_first_process_serves_on_the_pods_port():
    assert progress_port_for(9090, local_rank=0) == 9090  # rank 0, and every other rank's pod
    assert progress_port_for(9090, local_rank=1) is None  # a second process in a multi-GPU pod
    assert progress_port_for(None, local_rank=0) is None  # no port asked for


def test_every_rank_serves_progress_with_its_own_rank():
    env = {"KUBETUNE_PROGRESS_PORT": "0", "POD_IP": "127.0.0.1", "LOCAL_RANK": "0"}
    p = start_progress(None, 1, env)
    try:
        assert p.port and json.loads(get(p.port, "/progress"))["rank"] == 1
    finally:
        p.close()
    # the second process of a pod shares the pod's port: it does not serve
    second = start_progress(None, 3, {**env, "LOCAL_RANK": "1"})
    assert second.server is None and second.snapshot()["rank"] == 3


def test_a_rank_that_cannot_bind_trains_on_but_rank_0_fails():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"POD_IP": "127.0.0.1"}
        port = taken.getsockname()[1]
        p = start_progress(port, 1, env)
        assert p.server is None and p.snapshot()["rank"] == 1
        with pytest.raises(OSError):
            start_progress(port, 0, env)


def test_a_client_that_hangs_up_early_leaves_no_traceback_but_a_real_error_does(capsys):
    from kubetune_trainer.progress import QuietServer

    server = QuietServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    try:
        for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
            try:
                raise error
            except OSError:
                server.handle_error(None, ("10.0.0.1", 1234))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a bug in the handler")
        except ValueError:
            server.handle_error(None, ("10.0.0.1", 1234))
        assert "a bug in the handler" in capsys.readouterr().err
    finally:
        server.server_close()
