"""Exact resume: a run stopped by SIGTERM (or killed by SIGKILL) and started again
consumes the same samples and ends with the same adapter as a run never interrupted.
Real trainer processes, data streamed from a real MinIO."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import signal
from pathlib import Path

import pytest

from kubetune_trainer.checkpoints import MANIFEST
from tests.helpers import wait_for
from tests.trainer.conftest import (
    adapter_tensors,
    committed_steps,
    max_abs_diff,
    post_checkpoint,
    run_trainer,
    start_trainer,
    tiny_config,
)

pytestmark = [pytest.mark.tools, pytest.mark.slow]

STEPS, EVERY = 40, 10


@pytest.fixture(scope="module")
def baseline(tiny_model, minio, sql_bucket, tmp_path_factory):
    """The uninterrupted run every other run is compared with."""
    run = run_trainer(
        tiny_config(tiny_model, "baseline"), tmp_path_factory.mktemp("baseline"), minio, "baseline"
    )
    return run.steps(), adapter_tensors(minio, "s3://runs/baseline/out/")


def samples_by_step(*runs) -> dict[int, list[str]]:
    """step -> samples, the later run winning (a resumed run redoes steps after its checkpoint)."""
    out: dict[int, list[str]] = {}
    for run in runs:
        for row in run.steps():
            out[row["step"]] = row["samples"]
    return out


def test_sigterm_at_a_random_step_then_resume_is_exact(baseline, tiny_model, minio, tmp_path):
    base_steps, base_adapter = baseline
    stop_at = random.Random().randint(3, STEPS - 5)
    cfg = tiny_config(tiny_model, f"sigterm-{stop_at}")
    first = start_trainer(cfg, tmp_path, minio, "first")
    wait_for(lambda: first.last_step() >= stop_at, 120, f"step {stop_at}", procs=[first.watch()])
    first.signal(signal.SIGTERM)
    assert first.wait(60) == 75, first.log_text()[-3000:]
    msg = first.termination_message()
    stopped = first.last_step()
    # the SIGTERM checkpoint is the step it stopped at: no step is lost
    assert msg["outcome"] == "preempted" and msg["step"] == stopped, msg
    assert msg["checkpoint"]["step"] == stopped and msg["checkpoint"]["uri"].endswith(f"step-{stopped:08d}/")

    second = run_trainer(cfg, tmp_path, minio, "second")
    assert f"(step {stopped})" in second.log_text(), "did not resume from the SIGTERM checkpoint"
    assert second.steps()[0]["step"] == stopped + 1
    # the same sample ids, step for step, as the uninterrupted run
    assert samples_by_step(first, second) == {row["step"]: row["samples"] for row in base_steps}
    diff = max_abs_diff(adapter_tensors(minio, cfg["output"]["uri"]), base_adapter)
    assert diff <= 1e-5, f"adapter differs from the uninterrupted run's by {diff}"


def test_sigkill_resumes_from_the_last_periodic_checkpoint(baseline, tiny_model, minio, tmp_path):
    base_steps, base_adapter = baseline
    cfg = tiny_config(tiny_model, "sigkill")
    first = start_trainer(cfg, tmp_path, minio, "first")
    s3 = minio.client()

    def committed() -> list[int]:
        keys = [
            o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="sigkill/ckpt/").get("Contents", [])
        ]
        return sorted(int(k.split("/")[2][5:]) for k in keys if k.endswith(MANIFEST))

    # kill between two periodic checkpoints, with at least one committed
    wait_for(
        lambda: committed() and first.last_step() >= committed()[-1] + 3,
        120,
        "a checkpoint and 3 more steps",
        procs=[first.watch()],
    )
    first.signal(signal.SIGKILL)
    first.wait(30)
    killed_at, last_ckpt = first.last_step(), committed()[-1]

    second = run_trainer(cfg, tmp_path, minio, "second")
    resumed = second.steps()[0]["step"] - 1
    assert resumed == last_ckpt, f"resumed from step {resumed}, newest committed checkpoint is {last_ckpt}"
    assert killed_at - resumed <= EVERY, "lost more steps than checkpoint.everySteps"
    assert samples_by_step(first, second) == {row["step"]: row["samples"] for row in base_steps}
    assert max_abs_diff(adapter_tensors(minio, cfg["output"]["uri"]), base_adapter) <= 1e-5


def test_corrupt_and_incomplete_newest_checkpoints_are_skipped(baseline, tiny_model, minio, tmp_path):
    _, base_adapter = baseline
    cfg = tiny_config(tiny_model, "corrupt")
    run_trainer(cfg, tmp_path, minio, "first")  # keeps checkpoints 20, 30 and the final 40
    s3 = minio.client()
    # newest (40): a flipped byte in its adapter; 30: its manifest gone (an upload cut short)
    key = "corrupt/ckpt/step-00000040/adapter_model.safetensors"
    body = bytearray(s3.get_object(Bucket="runs", Key=key)["Body"].read())
    body[-1] ^= 0xFF
    s3.put_object(Bucket="runs", Key=key, Body=bytes(body))
    s3.delete_object(Bucket="runs", Key=f"corrupt/ckpt/step-00000030/{MANIFEST}")

    second = run_trainer(cfg, tmp_path, minio, "second")
    log = second.log_text()
    assert "skipping checkpoint step 40: ValueError: adapter_model.safetensors: sha256" in log
    assert "skipping checkpoint step 30: no manifest" in log
    assert second.steps()[0]["step"] == 21, "should resume from step 20, the newest intact checkpoint"
    assert max_abs_diff(adapter_tensors(minio, cfg["output"]["uri"]), base_adapter) <= 1e-5


class Planted:
    """A pickle that, unpickled, leaves a file behind: what an attacker who can write the
    checkpoint prefix would put in optimizer.pt."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def replant(s3, prefix: str, step: int, files: dict[str, bytes]) -> None:
    """Rewrite checkpoint `step` with `files` and a manifest that matches them, as anyone
    with write access to the prefix can: the manifest's hashes prove nothing."""
    from kubetune_trainer.checkpoints import FORMAT_VERSION, step_dir

    folder = f"{prefix}/{step_dir(step)}"
    manifest = json.loads(s3.get_object(Bucket="runs", Key=f"{folder}/{MANIFEST}")["Body"].read())
    for name, body in files.items():
        s3.put_object(Bucket="runs", Key=f"{folder}/{name.lstrip('/')}", Body=body)
        manifest["files"][name] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    assert manifest["format"] == FORMAT_VERSION
    s3.put_object(Bucket="runs", Key=f"{folder}/{MANIFEST}", Body=json.dumps(manifest).encode())


def test_planted_and_broken_checkpoints_are_skipped_without_running_or_writing_anything(
    baseline, tiny_model, minio, tmp_path
):
    _, base_adapter = baseline
    cfg = tiny_config(tiny_model, "planted")
    cfg["checkpoint"]["keep"] = 4
    run_trainer(cfg, tmp_path, minio, "first")  # checkpoints 10, 20, 30, 40
    s3, prefix = minio.client(), "planted/ckpt"
    marker, escaped = tmp_path / "code-ran", tmp_path / "escaped" / "file"
    # 40: a pickle payload as its optimizer state, with a matching manifest
    replant(s3, prefix, 40, {"optimizer.pt": pickle.dumps(Planted(marker))})
    # 30: a manifest entry naming an absolute path (and the object it would fetch there)
    replant(s3, prefix, 30, {str(escaped): b"planted"})
    # 20: a manifest entry whose object is gone (deleted after the listing): an S3 404
    replant(s3, prefix, 20, {"gone.bin": b"x"})
    s3.delete_object(Bucket="runs", Key=f"{prefix}/step-00000020/gone.bin")

    second = run_trainer(cfg, tmp_path, minio, "second")
    log = second.log_text()
    assert not marker.exists(), "the planted pickle ran"
    assert not escaped.exists(), "a manifest name wrote outside the checkpoint folder"
    assert "skipping checkpoint step 40: UnpicklingError" in log
    assert "skipping checkpoint step 30: UnsafePath" in log
    assert "skipping checkpoint step 20: ClientError" in log
    assert second.steps()[0]["step"] == 11, "should resume from step 10, the newest usable checkpoint"
    assert max_abs_diff(adapter_tensors(minio, cfg["output"]["uri"]), base_adapter) <= 1e-5


def test_checkpoints_of_another_run_are_refused_not_resumed(tiny_model, minio, sql_bucket, tmp_path):
    cfg = tiny_config(tiny_model, "mixed", maxSteps=10)
    run_trainer(cfg, tmp_path, minio, "first")
    # the same checkpoint prefix, another adapter shape: resuming would train something else
    other = tiny_config(tiny_model, "mixed", maxSteps=20)
    other["lora"]["r"] = 4
    second = start_trainer(other, tmp_path, minio, "second")
    assert second.wait(120) == 78, second.log_text()[-3000:]
    msg = second.termination_message()
    assert msg["outcome"] == "config-error" and "made by another run" in msg["error"], msg
    # more steps of the same run resume from its checkpoint
    longer = tiny_config(tiny_model, "mixed", maxSteps=20)
    third = run_trainer(longer, tmp_path, minio, "third")
    assert third.steps()[0]["step"] == 11


def test_a_leftover_attempt_stops_writing_once_a_newer_one_holds_the_prefix(
    tiny_model, minio, sql_bucket, tmp_path
):
    s3 = minio.client()
    cfg = tiny_config(tiny_model, "fenced")
    # attempt 1 runs on (its pod force-deleted, its node partitioned) while attempt 2 starts
    old = start_trainer(cfg, tmp_path, minio, "attempt-1", extra_env={"KUBETUNE_ATTEMPT": "1"})
    wait_for(lambda: 10 in committed_steps(s3, "fenced/ckpt/"), 120, "checkpoint 10", procs=[old.watch()])
    s3.put_object(Bucket="runs", Key="fenced/ckpt/attempt.json", Body=b'{"attempt": 2}')
    claimed_at = old.last_step()
    assert old.wait(120) == 1, old.log_text()[-3000:]
    msg = old.termination_message()
    assert msg["outcome"] == "fenced" and "newer attempt" in msg["error"], msg
    # at most the checkpoint already under way when attempt 2 claimed; none pruned by attempt 1
    limit = -(-max(claimed_at, 1) // 10) * 10
    steps = committed_steps(s3, "fenced/ckpt/")
    assert 10 in steps and max(steps) <= limit and max(steps) < 40, (steps, claimed_at)
    assert not s3.list_objects_v2(Bucket="runs", Prefix="fenced/out/").get("Contents"), "a leftover published"
    # and a leftover that starts after the claim does not write at all
    late = start_trainer(cfg, tmp_path, minio, "attempt-1-late", extra_env={"KUBETUNE_ATTEMPT": "1"})
    assert late.wait(120) == 1 and late.termination_message()["outcome"] == "fenced"
    assert committed_steps(s3, "fenced/ckpt/") == steps


def test_a_requested_checkpoint_is_committed_while_training_goes_on_and_the_sigterm_after_it_loses_nothing(
    baseline, tiny_model, minio, tmp_path
):
    base_steps, base_adapter = baseline
    token = "t0ken-" + hashlib.sha256(str(random.random()).encode()).hexdigest()[:16]
    cfg = tiny_config(tiny_model, "requested")
    # no periodic checkpoints (they do not change what is trained): the requested one is
    # never a step a periodic one already saved
    cfg["checkpoint"]["everySteps"] = 1000
    first = start_trainer(cfg, tmp_path, minio, "first", extra_env={"KUBETUNE_CONTROL_TOKEN": token})
    s3 = minio.client()

    def committed() -> list[int]:
        keys = [
            o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="requested/ckpt/").get("Contents", [])
        ]
        return sorted(int(k.split("/")[2][5:]) for k in keys if k.endswith(MANIFEST))

    wait_for(lambda: first.last_step() >= 13, 120, "step 13", procs=[first.watch()])
    # only the operator, with the pod's token, may ask
    assert post_checkpoint(first, None)[0] == 401
    assert post_checkpoint(first, token[:-1] + "x")[0] == 401
    code, body = post_checkpoint(
        first, token, reason="node runner-0: cloud.google.com/impending-node-termination"
    )
    assert code == 202 and body["coalesced"] is False, body
    # asked again before it is taken or while it uploads: one checkpoint, not two
    code, again = post_checkpoint(first, token)
    assert code == 202 and again["coalesced"] is True, again
    asked_at = body["step"]
    wait_for(committed, 60, "the requested checkpoint", procs=[first.watch()])
    requested = committed()
    assert requested == [requested[0]] and requested[0] <= asked_at + 2, (committed(), asked_at)
    # training went on past it
    wait_for(lambda: first.last_step() >= requested[0] + 2, 60, "steps after it", procs=[first.watch()])
    first.signal(signal.SIGTERM)
    assert first.wait(60) == 75, first.log_text()[-3000:]
    log = first.log_text()
    assert log.index(f"checkpoint step {requested[0]} committed") < log.index("stop requested (SIGTERM)")
    assert "node runner-0: cloud.google.com/impending-node-termination" in log
    assert token not in log
    stopped = first.termination_message()["step"]
    assert first.termination_message()["checkpoint"]["step"] == stopped == first.last_step()

    second = run_trainer(cfg, tmp_path, minio, "second", extra_env={"KUBETUNE_LAST_SEEN_STEP": str(stopped)})
    assert second.steps()[0]["step"] == stopped + 1
    assert samples_by_step(first, second) == {row["step"]: row["samples"] for row in base_steps}
    assert max_abs_diff(adapter_tensors(minio, cfg["output"]["uri"]), base_adapter) <= 1e-5
    goodput = second.termination_message()["goodput"]
    assert goodput["attempts"] == 2 and goodput["stepsRecomputed"] == 0, goodput
    assert goodput["recomputedSeconds"] == 0 and goodput["restartSeconds"] > 0, goodput
    parts = goodput["usefulSeconds"] + goodput["lostSeconds"] + goodput["otherSeconds"]
    assert abs(parts - goodput["wallSeconds"]) <= 0.5, goodput
    assert 0 < goodput["ratio"] < 1


def get_progress(run) -> dict:
    import urllib.request

    port = run.env["KUBETUNE_PROGRESS_PORT"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return {}


def test_a_standby_loads_while_the_last_attempt_runs_and_resumes_exactly_once_told_to_start(
    baseline, tiny_model, minio, tmp_path
):
    """The next attempt started during a termination notice: it loads everything while
    the current one trains (and claims nothing: the current one keeps committing), then,
    told to start once that one has stopped, resumes from its SIGTERM checkpoint: the same
    adapter as an uninterrupted run, and a restart that costs only the restore."""
    base_steps, base_adapter = baseline
    token = "t0ken-standby-" + hashlib.sha256(str(random.random()).encode()).hexdigest()[:12]
    cfg = tiny_config(tiny_model, "standby")
    env = {"KUBETUNE_ATTEMPT": "2", "KUBETUNE_STANDBY": "1", "KUBETUNE_CONTROL_TOKEN": token}
    second = start_trainer(cfg, tmp_path, minio, "second", extra_env=env)
    wait_for(
        lambda: get_progress(second).get("phase") == "standby", 120, "the standby", procs=[second.watch()]
    )
    assert post_checkpoint(second, None, path="/start")[0] == 401  # only the operator starts it
    # the attempt it stands in for trains, and commits its checkpoints, beside it
    first = start_trainer(cfg, tmp_path, minio, "first", extra_env={"KUBETUNE_ATTEMPT": "1"})
    wait_for(
        lambda: 10 in committed_steps(minio.client(), "standby/ckpt/") and first.last_step() >= 12,
        120,
        "checkpoint 10 and step 12",
        procs=[first.watch()],
    )
    first.signal(signal.SIGTERM)
    assert first.wait(60) == 75, first.log_text()[-3000:]
    stopped = first.termination_message()["checkpoint"]["step"]
    assert stopped == first.last_step() and stopped in committed_steps(minio.client(), "standby/ckpt/")
    assert get_progress(second).get("phase") == "standby" and second.proc.poll() is None
    code, body = post_checkpoint(second, token, path="/start")
    assert code == 202 and body["again"] is False, body
    assert second.wait(300) == 0, second.log_text()[-3000:]
    assert second.steps()[0]["step"] == stopped + 1
    assert samples_by_step(first, second) == {row["step"]: row["samples"] for row in base_steps}
    assert max_abs_diff(adapter_tensors(minio, cfg["output"]["uri"]), base_adapter) <= 1e-5
    log = second.log_text()
    load = float(log.split("loaded on ")[1].split(" in ")[1].split(" s;")[0])
    goodput = second.termination_message()["goodput"]
    # its restart is the restore after the go, not the imports and the model load before it
    assert goodput["attempts"] == 2 and goodput["restartSeconds"] < load / 2, (goodput, load)


def test_a_standby_stopped_before_its_start_leaves_the_checkpoints_alone(
    tiny_model, minio, sql_bucket, tmp_path
):
    cfg = tiny_config(tiny_model, "standby-withdrawn")
    env = {"KUBETUNE_ATTEMPT": "2", "KUBETUNE_STANDBY": "1", "KUBETUNE_CONTROL_TOKEN": "t"}
    standby = start_trainer(cfg, tmp_path, minio, "standby", extra_env=env)
    wait_for(
        lambda: get_progress(standby).get("phase") == "standby", 120, "the standby", procs=[standby.watch()]
    )
    standby.signal(signal.SIGTERM)  # the notice was withdrawn: the operator deletes it
    assert standby.wait(60) == 75, standby.log_text()[-3000:]
    assert standby.termination_message()["outcome"] == "preempted"
    keys = minio.client().list_objects_v2(Bucket="runs", Prefix="standby-withdrawn/").get("Contents", [])
    assert not keys, [k["Key"] for k in keys]  # no fence claimed, nothing written
