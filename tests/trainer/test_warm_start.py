"""The adapter record (adapter.json beside the adapter) and warm start (lora.initFrom),
with the real trainer process on the tiny model and data in a real MinIO."""

from __future__ import annotations

import hashlib
import json

import pytest

from kubetune_trainer.contract import EXIT_CONFIG
from kubetune_trainer.library import base_fingerprint, data_fingerprint
from tests.trainer.conftest import run_trainer, start_trainer, tiny_config

pytestmark = [pytest.mark.tools, pytest.mark.slow]


def _record(s3, run: str) -> dict:
    return json.loads(s3.get_object(Bucket="runs", Key=f"{run}/out/adapter.json")["Body"].read())


def _history(s3, run: str) -> list:
    return json.loads(s3.get_object(Bucket="runs", Key=f"{run}/out/metrics.json")["Body"].read())["history"]


def test_adapter_record_and_a_warm_start_that_continues_from_it(tiny_model, minio, sql_bucket, tmp_path):
    s3 = minio.client()
    # A: trained on the training split; its eval loss is its loss on the eval split
    source_cfg = tiny_config(tiny_model, "ws-a", maxSteps=40, learningRate=5e-3)
    source = run_trainer(source_cfg, tmp_path, minio, "ws-a")
    record = _record(s3, "ws-a")
    weights = s3.get_object(Bucket="runs", Key="ws-a/out/adapter_model.safetensors")["Body"].read()
    assert record["adapter"] == {
        "uri": "s3://runs/ws-a/out/",
        "sha256": hashlib.sha256(weights).hexdigest(),
        "sizeBytes": len(weights),
    }
    assert record["base"]["model"] == f"file://{tiny_model}" and record["base"]["method"] == "qlora"
    assert record["base"]["fingerprint"] == base_fingerprint(tiny_model)
    shards = s3.list_objects_v2(Bucket="data", Prefix="sql/train/")["Contents"]
    expected_data = data_fingerprint(
        [(o["Key"].removeprefix("sql/train/"), o["ETag"].strip('"')) for o in shards]
    )
    assert record["dataset"] == {"uri": "s3://data/sql/train/", "fingerprint": expected_data, "shards": 10}
    assert record["task"] == "text-to-sql" and record["lora"]["r"] == 8 and record["training"]["steps"] == 40
    assert record["evaluation"]["evalLoss"] > 0 and "storage" not in record
    # the termination message carries the same fingerprints to the operator
    assert source.termination_message()["lineage"] == {
        "base": record["base"]["fingerprint"],
        "data": expected_data,
        "shards": 10,
    }
    source_eval = record["evaluation"]["evalLoss"]

    # B (warm) and C (fresh) train on new data, the eval split, with a first step that takes
    # all of it (32 sequences of 128 tokens; the split packs into fewer): B's first-step loss
    # is then the source adapter's loss on that data (A's eval loss), C's the base model's
    def on_new_data(run: str, init: dict | None) -> dict:
        cfg = tiny_config(tiny_model, run, maxSteps=1, loggingSteps=1, batchSize=8, gradientAccumulation=4)
        cfg["dataset"]["uri"] = "s3://data/sql/eval/"
        del cfg["dataset"]["validation"]
        cfg["lora"]["dropout"] = 0.0  # the first step's loss without noise
        if init:
            cfg["lora"]["initFrom"] = init
        return cfg

    warm = run_trainer(on_new_data("ws-b", {"uri": "s3://runs/ws-a/out/"}), tmp_path, minio, "ws-b")
    run_trainer(on_new_data("ws-c", None), tmp_path, minio, "ws-c")
    warm_first, fresh_first = _history(s3, "ws-b")[0][1], _history(s3, "ws-c")[0][1]
    print(
        f"first-step loss: warm {warm_first:.3f}, fresh {fresh_first:.3f}; source eval loss {source_eval:.3f}"
    )
    assert "warm start: " in warm.log_text()
    assert abs(warm_first - source_eval) < 0.2 * abs(fresh_first - source_eval)
    assert warm_first < fresh_first
    warm_record = _record(s3, "ws-b")
    assert warm_record["initFrom"] == {"uri": "s3://runs/ws-a/out/"}

    # refused: another adapter shape; a pinned sha256 the object does not have (changed in S3)
    shape = on_new_data("ws-d", {"uri": "s3://runs/ws-a/out/"})
    shape["lora"]["r"] = 4
    wrong = start_trainer(shape, tmp_path, minio, "ws-d")
    assert wrong.wait(300) == EXIT_CONFIG
    assert "rank 8" in wrong.termination_message()["error"]
    tampered = on_new_data("ws-e", {"uri": "s3://runs/ws-a/out/", "sha256": "0" * 64})
    changed = start_trainer(tampered, tmp_path, minio, "ws-e")
    assert changed.wait(300) == EXIT_CONFIG
    assert "changed after it was registered" in changed.termination_message()["error"]
