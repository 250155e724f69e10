"""/progress during a real (tiny) training run, in process: the step moves on every
optimizer step, not only every loggingSteps; a step has a time; an evaluation pass and a
checkpoint are phases of their own, so that none reads as a stalled rank."""

from __future__ import annotations

import os

import pytest

from kubetune_trainer.config import TrainingConfig
from kubetune_trainer.progress import ProgressServer
from kubetune_trainer.train import Preempted, Trainer
from tests.helpers import SQL_DATA
from tests.trainer.conftest import tiny_config

pytestmark = [pytest.mark.tools, pytest.mark.slow]

STOP_AT, LOGGING = 7, 5  # a stop between two logging steps


class Recording(ProgressServer):
    """A ProgressServer that keeps every phase and activity it was given."""

    def __init__(self) -> None:
        super().__init__(None)
        self.phases: list[str] = []
        self.activities: list[str | None] = []

    def update(self, **fields) -> None:
        super().update(**fields)
        if "phase" in fields:
            self.phases.append(fields["phase"])

    def set_activity(self, activity) -> None:
        super().set_activity(activity)
        self.activities.append(activity)


class StopAt:
    """A stop flag asked at every step boundary: keeps what /progress said there, and
    asks to stop once it says step `at`."""

    signal_name = "SIGTERM"

    def __init__(self, progress: ProgressServer, at: int) -> None:
        self.progress, self.at = progress, at
        self.seen: list[dict] = []

    def __bool__(self) -> bool:
        self.seen.append(self.progress.snapshot())
        return self.seen[-1]["step"] >= self.at


@pytest.fixture
def s3_env(minio, monkeypatch):
    for k, v in {**minio.env(), "KUBETUNE_BACKEND": "cpu"}.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def small_eval(minio, sql_bucket) -> str:
    """8 held-out records: evaluation passes that take little time."""
    rows = (SQL_DATA / "eval" / "eval.jsonl").read_text().splitlines()[:8]
    minio.client().put_object(Bucket="data", Key="progress-eval/eval.jsonl", Body="\n".join(rows).encode())
    return "s3://data/progress-eval/"


def test_the_step_moves_every_optimizer_step_and_evaluation_is_its_own_phase(
    tiny_model, small_eval, s3_env, tmp_path
):
    cfg = tiny_config(tiny_model, "progress-steps", maxSteps=20, loggingSteps=LOGGING, evalSteps=3)
    cfg["dataset"]["validation"]["uri"] = small_eval
    cfg["checkpoint"]["everySteps"] = 4
    progress = Recording()
    stop = StopAt(progress, STOP_AT)
    trainer = Trainer(
        TrainingConfig.model_validate(cfg),
        stop=stop,
        progress=progress,
        workdir=tmp_path / "work",
        environ=dict(os.environ),
    )
    with pytest.raises(Preempted) as stopped:
        trainer.run()
    trainer.ckpts.close()
    trainer.close()
    assert stopped.value.step == STOP_AT
    # at every step boundary, the step done so far: not the last multiple of loggingSteps
    assert [s["step"] for s in stop.seen] == list(range(STOP_AT + 1))
    body = progress.snapshot()
    assert body["step"] == STOP_AT and body["rank"] == 0
    assert body["stepSeconds"] is not None and 0 < body["stepSeconds"] < 60
    assert all(s["stepSeconds"] is None for s in stop.seen[:1])  # none before the first step
    assert all(s["stepSeconds"] > 0 for s in stop.seen[1:])
    # loss and rates still only every loggingSteps: the last logged was step 5's
    assert body["loss"] is not None and body["tokensPerSecond"] > 0
    # every step: data (the next micro-batches), then compute; none once the loop is left
    per_step = progress.activities[: 2 * STOP_AT]
    assert per_step == ["data", "compute"] * STOP_AT
    assert body["activity"] is None and progress.activities[-1] is None
    assert all(s["activity"] == "compute" for s in stop.seen)  # a stop check is a collective
    # evaluations (steps 3 and 6) and the periodic checkpoint (step 4): each a phase of
    # its own, then back to training; the stop's checkpoint last
    phases = [p for i, p in enumerate(progress.phases) if i == 0 or p != progress.phases[i - 1]]
    assert phases == [
        "loading",
        "training",
        "evaluating",
        "training",
        "checkpointing",
        "training",
        "evaluating",
        "training",
        "checkpointing",
    ], progress.phases
    assert body["phase"] == "checkpointing" and body["lastCheckpointStep"] == STOP_AT
