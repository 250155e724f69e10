"""The trainer process contract, observed from outside: exit codes, the termination
message, /progress and /metrics while it runs, and no credential anywhere."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.helpers import train_events, wait_for
from tests.trainer.conftest import run_trainer, start_trainer, tiny_config

pytestmark = pytest.mark.tools


def get(port: str, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
        return r.read()


@pytest.mark.slow
def test_progress_and_metrics_while_training_and_no_secret_anywhere(tiny_model, minio, sql_bucket, tmp_path):
    cfg = tiny_config(tiny_model, "progress", maxSteps=60, loggingSteps=2)
    run = start_trainer(cfg, tmp_path, minio, "progress")
    port = run.env["KUBETUNE_PROGRESS_PORT"]
    progress = wait_for(
        lambda: (p := json.loads(get(port, "/progress")))["step"] >= 4 and p,
        120,
        "progress at step 4",
        procs=[run.watch()],
    )
    assert progress["totalSteps"] == 60 and progress["phase"] == "training"
    assert progress["loss"] > 0 and progress["tokensPerSecond"] > 0 and progress["etaSeconds"] is not None
    metrics = get(port, "/metrics").decode()
    assert "kubetune_trainer_step " in metrics and "kubetune_trainer_total_steps 60.0" in metrics
    assert run.wait(300) == 0
    message = run.termination_message()
    assert message["outcome"] == "completed" and message["step"] == 60
    assert message["adapter"]["uri"] == "s3://runs/progress/out/" and len(message["adapter"]["sha256"]) == 64
    # one structured line per logging step
    lines = train_events(run.log_text())
    assert [entry["step"] for entry in lines] == list(range(2, 61, 2))
    for secret in (minio.secret_key, minio.access_key):
        for where, text in [
            ("log", run.log_text()),
            ("termination message", run.termination.read_text()),
            ("progress", json.dumps(progress)),
            ("metrics", metrics),
        ]:
            assert secret not in text, f"a credential appears in the trainer's {where}"


@pytest.mark.slow
def test_invalid_config_exits_78_with_a_clear_message(tiny_model, minio, tmp_path):
    cfg = tiny_config(tiny_model, "bad")
    cfg["lora"]["r"] = 0
    run = start_trainer(cfg, tmp_path, minio, "bad")
    assert run.wait(60) == 78
    msg = run.termination_message()
    assert msg["outcome"] == "config-error" and "lora.r" in msg["error"]


@pytest.mark.slow
def test_a_dataset_prefix_without_shards_exits_65(tiny_model, minio, sql_bucket, tmp_path):
    cfg = tiny_config(tiny_model, "empty")
    cfg["dataset"]["uri"] = "s3://data/nothing-here/"
    run = start_trainer(cfg, tmp_path, minio, "empty")
    assert run.wait(120) == 65
    assert (
        "no .jsonl, .jsonl.gz, .jsonl.zst, .parquet shards under s3://data/nothing-here"
        in run.termination_message()["error"]
    )


@pytest.mark.slow
def test_output_is_a_peft_adapter_with_card_metrics_and_loss_curve(tiny_model, minio, sql_bucket, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_model, "export", maxSteps=12)
    cfg["output"]["mergedModel"] = True
    run = run_trainer(cfg, tmp_path, minio, "export")
    # status.evaluation's source: the held-out split and its scores, in the termination message
    evaluation = run.termination_message()["evaluation"]
    assert evaluation["split"] == "s3://data/sql/eval/" and evaluation["evalLoss"] > 0
    s3 = minio.client()
    keys = {
        o["Key"].split("/", 2)[2] for o in s3.list_objects_v2(Bucket="runs", Prefix="export/out/")["Contents"]
    }
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "metrics.json",
        "loss_curve.png",
        "README.md",
    } <= keys
    # written last, listing exactly what is there; nothing left in staging
    marker = json.loads(s3.get_object(Bucket="runs", Key="export/out/_COMPLETE.json")["Body"].read())
    assert set(marker["files"]) == keys - {"_COMPLETE.json"}
    local = tmp_path / "adapter"
    local.mkdir()
    for k in keys:
        (local / k).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("runs", f"export/out/{k}", str(local / k))
    assert (local / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((local / "metrics.json").read_text())
    assert metrics["steps"] == 12 and len(metrics["history"]) == 12 and metrics["eval_loss"] > 0
    assert "library_name: peft" in (local / "README.md").read_text()
    # loads with peft onto the (unquantized) base model
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), local)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # and the merged model (mergedModel: true) is a plain model with the adapter folded into
    # the dequantized 4-bit base it was trained on, in the run's compute dtype (QLoRA's merge;
    # tests/trainer/test_merged_export.py checks its logits against training's)
    import torch
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, metrics["compute_dtype"])
    merged = AutoModelForCausalLM.from_pretrained(local / "merged")
    assert merged.dtype == dtype and not any("lora" in n for n, _ in merged.named_parameters())
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    trained_base = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant, dtype=dtype)
    on_trained_base = PeftModel.from_pretrained(trained_base.dequantize(dtype=dtype), local)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        want = on_trained_base(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    # bf16 (auto on CPUs with AMX) rounds the merged weights: measured 5.9e-3; merging into the
    # unquantized weights instead is 7e-2 off
    diff = float((want - got).abs().max())
    print(f"merged vs adapter on the dequantized base ({dtype}): max logit difference {diff:.2e}")
    assert diff < (1e-4 if dtype == torch.float32 else 2e-2)


def test_the_demo_keeps_its_outputs_out_of_the_throwaway_cluster(minio, tmp_path):
    """`make demo` copies the adapter folder out of the dev cluster's MinIO before the
    cluster goes, and prints a snippet that loads it from there."""
    from kubetune_dev.demo import keep_outputs, load_snippet

    s3 = minio.client()
    s3.create_bucket(Bucket="demo-runs")
    files = {"adapter_model.safetensors": b"w" * 10, "README.md": b"# card", "merged/config.json": b"{}"}
    for name, body in files.items():
        s3.put_object(Bucket="demo-runs", Key=f"quickstart/adapter/{name}", Body=body)
    s3.put_object(Bucket="demo-runs", Key="quickstart/checkpoints/step-1/x", Body=b"not kept")
    kept = keep_outputs(s3, "demo-runs", "quickstart/adapter/", tmp_path / "runs" / "demo")
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == sorted(files)
    assert (kept / "merged" / "config.json").read_bytes() == b"{}"
    for method in ("lora", "qlora"):
        snippet = load_snippet(kept, tmp_path / "base", method)
        assert f'"{kept}"' in snippet and f'"{tmp_path / "base"}"' in snippet and "file://" not in snippet
        # the base is loaded as the adapter was trained on it: 4-bit for qlora only
        assert ("load_in_4bit=True" in snippet) == (method == "qlora")
        code = "\n".join(line.strip() for line in snippet.splitlines()[1:])
        compile(code, "snippet", "exec")  # it runs as printed
