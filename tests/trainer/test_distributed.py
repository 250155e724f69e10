"""Data-parallel training on CPU with gloo, real trainer processes: two ranks with half
the batch each train exactly what one rank with the whole batch trains, deal the data
without overlap or gap, stop together when only one of them is told to, and resume
exactly. Also the pod launcher (several processes in one pod, torchrun's environment)."""

from __future__ import annotations

import json
import random
import signal
import urllib.request
from collections import Counter

import pytest

from kubetune_dev.devcluster.procs import free_port
from tests.helpers import SQL_DATA, wait_for
from tests.trainer.conftest import adapter_tensors, max_abs_diff, run_trainer, start_trainer, tiny_config

pytestmark = [pytest.mark.tools, pytest.mark.slow]

STEPS = 16
SMALL_PREFIX = "sql-small/train/"
SMALL_RECORDS = 60  # about 8 steps an epoch: the run crosses an epoch boundary


@pytest.fixture(scope="module")
def small_data(minio, sql_bucket) -> list[str]:
    """60 records in 3 shards: ids in the order they are stored."""
    import json

    rows = (SQL_DATA / "train" / "train-00000.jsonl").read_text().splitlines()[:SMALL_RECORDS]
    s3 = minio.client()
    for i in range(3):
        body = "\n".join(rows[i * 20 : (i + 1) * 20]) + "\n"
        s3.put_object(Bucket="data", Key=f"{SMALL_PREFIX}part-{i}.jsonl", Body=body.encode())
    return [json.loads(r)["id"] for r in rows]


def config(tiny_model, run: str, batch_size: int) -> dict:
    cfg = tiny_config(tiny_model, run, maxSteps=STEPS, batchSize=batch_size, gradientAccumulation=2)
    cfg["dataset"]["uri"] = f"s3://data/{SMALL_PREFIX}"
    cfg["lora"]["dropout"] = 0.0  # dropout masks are drawn per rank: off, to compare exactly
    cfg["checkpoint"]["everySteps"] = 4
    return cfg


def rank_env(rank: int, world: int, port: int) -> dict:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def start_ranks(cfg, workdir, minio, name: str, world: int = 2):
    port = free_port()
    return [
        start_trainer(cfg, workdir, minio, f"{name}-r{r}", extra_env=rank_env(r, world, port))
        for r in range(world)
    ]


def get_progress(port: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5) as r:
        return r.read()


def per_step(*runs) -> dict[int, Counter]:
    """step -> the samples of that step over all ranks (later runs win: a resumed run
    redoes the steps after its checkpoint)."""
    out: dict[int, Counter] = {}
    for group in runs:
        fresh: dict[int, Counter] = {}
        for run in group:
            for row in run.steps():
                fresh.setdefault(row["step"], Counter()).update(row["samples"])
        out.update(fresh)
    return out


@pytest.fixture(scope="module")
def one_rank(tiny_model, minio, small_data, tmp_path_factory):
    """The reference: one process with the whole global batch (2 x 4 sequences)."""
    run = run_trainer(config(tiny_model, "dp-one", 4), tmp_path_factory.mktemp("dp-one"), minio, "one")
    return run, adapter_tensors(minio, "s3://runs/dp-one/out/")


@pytest.fixture(scope="module")
def two_ranks(tiny_model, minio, small_data, tmp_path_factory):
    """Two processes, 2 x 2 sequences each: the same global batch."""
    ranks = start_ranks(config(tiny_model, "dp-two", 2), tmp_path_factory.mktemp("dp-two"), minio, "two")
    for r in ranks:
        assert r.wait(300) == 0, r.log_text()[-3000:]
    return ranks, adapter_tensors(minio, "s3://runs/dp-two/out/")


def test_two_ranks_train_what_one_rank_with_the_whole_batch_trains(one_rank, two_ranks):
    (one, one_adapter), (ranks, two_adapter) = one_rank, two_ranks
    assert "rank 1 of 2 joined (gloo)" in ranks[1].log_text()
    # the same samples in every step; no sample on both ranks in one step
    assert per_step([one]) == per_step(ranks)
    for r0, r1 in zip(ranks[0].steps(), ranks[1].steps(), strict=True):
        assert r0["step"] == r1["step"] and not set(r0["samples"]) & set(r1["samples"])
    diff = max_abs_diff(two_adapter, one_adapter)
    assert diff <= 1e-4, f"2-rank adapter differs from the 1-rank one by {diff}"
    # only rank 0 exports; both report the same last step
    assert [r.termination_message()["step"] for r in ranks] == [STEPS, STEPS]
    assert "adapter" in ranks[0].termination_message() and "adapter" not in ranks[1].termination_message()


def test_every_sample_once_per_epoch(two_ranks, small_data):
    ranks, _ = two_ranks
    steps = per_step(ranks)
    seen: Counter = Counter()
    for step in sorted(steps):
        before = sum(seen.values())
        seen.update(steps[step])
        if sum(seen.values()) <= len(small_data):
            assert max(seen.values()) == 1, f"a sample came twice within epoch 1 by step {step}"
        elif before < len(small_data):
            # the step that completes the epoch has seen every sample
            assert set(seen) == set(small_data), "samples missing from epoch 1"
    assert sum(seen.values()) > len(small_data), "the run should cross an epoch boundary"


def test_sigterm_to_rank_1_stops_both_at_one_step_then_resumes_exactly(
    two_ranks, tiny_model, minio, tmp_path
):
    _, uninterrupted = two_ranks
    stop_at = random.Random().randint(3, STEPS - 4)
    cfg = config(tiny_model, f"dp-stop-{stop_at}", 2)
    first = start_ranks(cfg, tmp_path, minio, "first")
    wait_for(
        lambda: first[1].last_step() >= stop_at,
        180,
        f"step {stop_at}",
        procs=[r.watch() for r in first],
    )
    # every rank answers /progress (its own pod's port): rank 1 at its own step
    progress = [json.loads(get_progress(r.env["KUBETUNE_PROGRESS_PORT"])) for r in first]
    assert [p["rank"] for p in progress] == [0, 1]
    assert progress[1]["step"] >= stop_at and progress[1]["stepSeconds"] > 0, progress[1]
    assert progress[1]["activity"] in ("data", "compute") and progress[1]["phase"] == "training", progress[1]
    first[1].signal(signal.SIGTERM)  # rank 0 is never signalled
    codes = [r.wait(120) for r in first]
    assert codes == [75, 75], [r.log_text()[-2000:] for r in first]
    msgs = [r.termination_message() for r in first]
    stopped = first[0].last_step()
    assert first[1].last_step() == stopped and [m["step"] for m in msgs] == [stopped, stopped]
    # one checkpoint, committed by rank 0 at the stop step, named by both
    assert msgs[0]["checkpoint"] == msgs[1]["checkpoint"] and msgs[0]["checkpoint"]["step"] == stopped

    second = start_ranks(cfg, tmp_path, minio, "second")
    assert [r.wait(300) for r in second] == [0, 0], second[0].log_text()[-3000:]
    assert f"(step {stopped})" in second[0].log_text()
    assert min(row["step"] for row in second[1].steps()) == stopped + 1
    diff = max_abs_diff(adapter_tensors(minio, cfg["output"]["uri"]), uninterrupted)
    assert diff <= 1e-5, f"resumed adapter differs from the uninterrupted 2-rank run's by {diff}"


def test_pod_launcher_runs_one_rank_per_process(two_ranks, tiny_model, minio, tmp_path):
    """One pod, two processes (gpusPerWorker 2): the launcher gives each torchrun's
    environment; the result is the 2-rank run's, and the pod exits with the trainer's code."""
    _, two_adapter = two_ranks
    cfg = config(tiny_model, "dp-launch", 2)
    env = {
        "KUBETUNE_RANK": "0",
        "KUBETUNE_WORKERS": "1",
        "KUBETUNE_PROCS_PER_WORKER": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    pod = start_trainer(cfg, tmp_path, minio, "pod", extra_env=env, module="kubetune_trainer.launch")
    assert pod.wait(300) == 0, pod.log_text()[-3000:]
    log = pod.log_text()
    assert "rank0 " in log and "rank1 " in log
    assert pod.termination_message()["outcome"] == "completed"
    assert max_abs_diff(adapter_tensors(minio, cfg["output"]["uri"]), two_adapter) <= 1e-5


def lora_config(tiny_model, run: str, batch_size: int, strategy: str) -> dict:
    """Plain LoRA (no 4-bit weights: FSDP cannot split bitsandbytes' CPU NF4 tensors)."""
    cfg = config(tiny_model, run, batch_size)
    cfg["method"] = "lora"
    cfg["training"]["strategy"] = strategy
    # the whole base in float32: sharded and unsharded runs differ only in summation order,
    # which a bf16 base (auto on CPUs with AMX) magnifies past the tolerance
    cfg["quantization"] = {"computeDtype": "float32"}
    return cfg


def test_fsdp_shards_the_model_and_resumes_exactly(one_rank, tiny_model, minio, tmp_path):
    """FSDP (the strategy for base models too big for one GPU) on CPU with gloo: 2 ranks
    train what 1 rank with the whole batch trains; a stop on rank 1 gathers one checkpoint
    from the shards, and the resumed run ends with the uninterrupted run's adapter."""
    single = run_trainer(lora_config(tiny_model, "fsdp-one", 4, "ddp"), tmp_path, minio, "single")
    whole = start_ranks(lora_config(tiny_model, "fsdp-two", 2, "fsdp"), tmp_path, minio, "whole")
    assert [r.wait(300) for r in whole] == [0, 0], whole[0].log_text()[-3000:]
    sharded = adapter_tensors(minio, "s3://runs/fsdp-two/out/")
    assert max_abs_diff(sharded, adapter_tensors(minio, "s3://runs/fsdp-one/out/")) <= 1e-4
    assert per_step([single]) == per_step(whole)

    cfg = lora_config(tiny_model, "fsdp-stop", 2, "fsdp")
    first = start_ranks(cfg, tmp_path, minio, "first")
    wait_for(lambda: first[1].last_step() >= 5, 180, "step 5", procs=[r.watch() for r in first])
    first[1].signal(signal.SIGTERM)
    assert [r.wait(120) for r in first] == [75, 75], first[0].log_text()[-3000:]
    stopped = first[0].termination_message()["checkpoint"]["step"]
    second = start_ranks(cfg, tmp_path, minio, "second")
    assert [r.wait(300) for r in second] == [0, 0], second[0].log_text()[-3000:]
    assert f"(step {stopped})" in second[1].log_text()
    assert max_abs_diff(adapter_tensors(minio, cfg["output"]["uri"]), sharded) <= 1e-5
