"""The seed notebooks' Intel stack, for real, on CPU: the trainer's ipex-llm backend
(ipex-llm 2.2 QLoRA + intel-extension-for-pytorch 2.8, in its own venv from
requirements/ipex-llm.lock) trains, stops on SIGTERM and resumes exactly, and exports an
adapter that stock peft and transformers (this venv's) load and compute as training did.

ipex-llm has no NF4 kernels on CPU (its forward refuses them), so there the base is
quantized to sym_int4 (kubetune_trainer.model.ipex_llm_low_bit); on an Intel GPU it is NF4.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess

import pytest
import torch

from kubetune_dev.devcluster.cluster import repo_pythonpath
from tests.helpers import REPO_ROOT, train_events, wait_for
from tests.trainer.conftest import (
    adapter_tensors,
    max_abs_diff,
    run_trainer,
    start_trainer,
    tiny_config,
)

pytestmark = [pytest.mark.tools, pytest.mark.slow]

IPEX = {"KUBETUNE_BACKEND": "ipex-llm"}
STEPS = 40
# Resume: with one thread (OMP_NUM_THREADS=1, conftest) every run sums in the same order,
# and the checkpoint holds the LoRA weights, the optimizer, the scheduler and the RNG
# states bit for bit: measured max |Δ| 0.0 between a resumed and an uninterrupted run on
# this backend, as on the bitsandbytes one; the bound is the bitsandbytes tests' own.
RESUME_TOLERANCE = 1e-5
# Stock transformers + peft on the dequantized low-bit weights against training's logits:
# in training ipex-llm's low-bit layers dequantize and multiply in float32 (every one of
# them: kubetune_trainer.model._load_ipex_llm), so only the summation order differs.
# Measured max |Δ| 2.5e-7 on logits of size ~1; on the original (unquantized) base the
# adapter is 6e-2 off, the 4-bit quantization's error.
STOCK_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ipex_python() -> str:
    """The ipex-llm venv's interpreter (made from requirements/ipex-llm.lock if missing)."""
    out = subprocess.run(
        [str(REPO_ROOT / "hack" / "ensure-env.sh"), "--stack", "ipex-llm"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() + "/bin/python"


@pytest.fixture(scope="module")
def ipex_baseline(ipex_python, tiny_model, minio, sql_bucket, tmp_path_factory):
    run = run_trainer(
        tiny_config(tiny_model, "ipex-baseline"),
        tmp_path_factory.mktemp("ipex-baseline"),
        minio,
        "baseline",
        extra_env=IPEX,
        python=ipex_python,
    )
    return run


def test_ipex_llm_trains_on_cpu_in_4_bits_and_resumes_exactly_after_sigterm(
    ipex_python, ipex_baseline, tiny_model, minio, tmp_path
):
    log = ipex_baseline.log_text()
    assert "loaded on cpu (backend ipex-llm, compute dtype float32)" in log, log[-3000:]
    assert "quantized to sym_int4" in log and "Converting the current model to sym_int4" in log, log[-3000:]
    losses = [event["loss"] for event in train_events(log)]
    assert losses[-1] < losses[0], losses

    stop_at = random.Random().randint(3, STEPS - 5)
    cfg = tiny_config(tiny_model, f"ipex-sigterm-{stop_at}")
    first = start_trainer(cfg, tmp_path, minio, "first", extra_env=IPEX, python=ipex_python)
    wait_for(lambda: first.last_step() >= stop_at, 120, f"step {stop_at}", procs=[first.watch()])
    first.signal(signal.SIGTERM)
    assert first.wait(60) == 75, first.log_text()[-3000:]
    msg = first.termination_message()
    stopped = first.last_step()
    assert msg["outcome"] == "preempted" and msg["checkpoint"]["step"] == stopped, msg

    second = run_trainer(cfg, tmp_path, minio, "second", extra_env=IPEX, python=ipex_python)
    assert f"(step {stopped})" in second.log_text(), "did not resume from the SIGTERM checkpoint"
    assert second.steps()[0]["step"] == stopped + 1
    resumed = {row["step"]: row["samples"] for run in (first, second) for row in run.steps()}
    assert resumed == {row["step"]: row["samples"] for row in ipex_baseline.steps()}
    diff = max_abs_diff(
        adapter_tensors(minio, cfg["output"]["uri"]), adapter_tensors(minio, "s3://runs/ipex-baseline/out/")
    )
    print(f"resumed after SIGTERM at step {stopped}: adapter max |Δ| {diff:.2e} from the uninterrupted run's")
    assert diff <= RESUME_TOLERANCE, f"adapter differs from the uninterrupted run's by {diff}"


def keys_under(s3, prefix: str) -> dict[str, set[str]]:
    """folder (relative to prefix) -> file names, of everything under an s3://runs prefix."""
    out: dict[str, set[str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix):
        for obj in page.get("Contents", []):
            folder, _, name = obj["Key"][len(prefix) :].rpartition("/")
            out.setdefault(folder, set()).add(name)
    return out


def test_checkpoints_and_adapter_have_the_bitsandbytes_backends_layout(
    ipex_baseline, tiny_model, minio, sql_bucket, tmp_path
):
    """The same files, folder for folder, and the same adapter tensors as the cpu backend's
    (bitsandbytes NF4, the main venv) for the same job."""
    run_trainer(tiny_config(tiny_model, "bnb-layout", maxSteps=10), tmp_path, minio, "bnb")
    s3 = minio.client()
    ipex_ckpt, bnb_ckpt = keys_under(s3, "ipex-baseline/ckpt/"), keys_under(s3, "bnb-layout/ckpt/")
    steps = {folder: names for folder, names in ipex_ckpt.items() if folder.startswith("step-")}
    assert steps and all(names == bnb_ckpt["step-00000010"] for names in steps.values()), (steps, bnb_ckpt)
    # the output folder: the same files, but for the tokenizer's own, which differ between
    # transformers 4 and 5 (4 also writes special_tokens_map.json)
    ipex_out, bnb_out = keys_under(s3, "ipex-baseline/out/")[""], keys_under(s3, "bnb-layout/out/")[""]
    assert ipex_out ^ bnb_out <= {"special_tokens_map.json"}, ipex_out ^ bnb_out
    ipex = adapter_tensors(minio, "s3://runs/ipex-baseline/out/")
    bnb = adapter_tensors(minio, "s3://runs/bnb-layout/out/")
    assert {k: (v.shape, v.dtype) for k, v in ipex.items()} == {k: (v.shape, v.dtype) for k, v in bnb.items()}


def test_the_exported_adapter_loads_with_stock_peft_and_gives_training_logits(
    ipex_python, ipex_baseline, tiny_model, minio, tmp_path
):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    s3 = minio.client()
    for obj in s3.list_objects_v2(Bucket="runs", Prefix="ipex-baseline/out/")["Contents"]:
        name = obj["Key"].rsplit("/", 1)[1]
        (adapter / name).write_bytes(s3.get_object(Bucket="runs", Key=obj["Key"])["Body"].read())
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "training_mode" not in config, "ipex-llm's own key left in adapter_config.json"

    # the same tensors, by name and shape, as stock peft makes for this LoRA on this base
    stock = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"]),
    )
    from peft import get_peft_model_state_dict

    want_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(stock).items()}
    got_shapes = {k: tuple(v.shape) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    assert got_shapes == want_shapes

    ids = torch.randint(4, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(tiny_config(tiny_model, "ipex-baseline")))
    probe = subprocess.run(
        [
            ipex_python,
            str(REPO_ROOT / "tests" / "trainer" / "ipex_llm_probe.py"),
            str(cfg_file),
            str(adapter),
            str(tmp_path / "ids.json"),
            str(tmp_path / "probe"),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": repo_pythonpath(), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-4000:]
    probed = load_file(str(tmp_path / "probe" / "logits.safetensors"))
    trained = probed["logits"]

    with torch.no_grad():
        on_dequantized = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "probe" / "base", dtype=torch.float32),
            str(adapter),
        ).eval()
        got = on_dequantized(input_ids=ids).logits.float()
        on_original = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(adapter)
        ).eval()
        original = on_original(input_ids=ids).logits.float()
    err = (got - trained).abs().max().item()
    quantization_err = (original - trained).abs().max().item()
    eval_err = (probed["eval_logits"] - trained).abs().max().item()
    print(
        f"stock on the dequantized base: max |Δ| {err:.2e}; on the original base: {quantization_err:.2e}; "
        f"ipex-llm's own eval-mode kernel (int8 inputs): {eval_err:.2e}"
    )
    assert err <= STOCK_TOLERANCE, f"stock peft on the dequantized base differs from training by {err}"
    # the adapter did change the outputs, and the 4-bit base is not the original one
    assert quantization_err > err


def test_smollm2_real_weights_train_through_ipex_llm_qlora(ipex_python, minio, sql_bucket, tmp_path):
    """Real weights (SmolLM2-135M-Instruct, a folder written by transformers 5) in the
    ipex-llm stack's transformers 4: the loss starts where a pretrained model's does, not
    where a misread one's would, and falls."""
    from kubetune_dev.local_models import cached_smollm2

    cfg = tiny_config(cached_smollm2(), "ipex-smollm2", maxSteps=8, loggingSteps=2)
    cfg["dataset"].pop("validation")
    cfg["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "k_proj", "v_proj"]}
    run = run_trainer(cfg, tmp_path, minio, "smollm2", extra_env=IPEX, python=ipex_python, timeout=600)
    log = run.log_text()
    assert "quantized to sym_int4" in log and "backend ipex-llm" in log, log[-3000:]
    losses = [event["loss"] for event in train_events(log)]
    # a random 49k-vocabulary model starts at ln(49152) = 10.8; SmolLM2 on this data near 2
    assert losses[0] < 4, losses
    assert losses[-1] < losses[0], losses
