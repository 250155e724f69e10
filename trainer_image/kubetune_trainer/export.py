"""What a finished run leaves at output.uri: the adapter (adapter_model.safetensors +
adapter_config.json, loadable with peft's PeftModel.from_pretrained), the tokenizer,
training metrics, a loss-curve PNG and a short model card; optionally the merged model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kubetune_trainer.checkpoints import sha256_file
from kubetune_trainer.storage import open_store

log = logging.getLogger("kubetune.export")


def plot_loss_curve(history: list, eval_loss: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history:
        steps, losses = zip(*history, strict=True)
        ax.plot(steps, losses, lw=1, alpha=0.4, label="loss per step")
        k = max(1, len(losses) // 20)  # a moving average makes the trend readable
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, lw=2, label=f"moving average ({k} steps)")
    if eval_loss is not None and history:
        ax.axhline(eval_loss, color="tab:red", ls="--", lw=1, label=f"final eval loss {eval_loss:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(cfg, metrics: dict) -> str:
    base = cfg.model.name or cfg.model.uri
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [lora, qlora, kubetune]" if cfg.method == "qlora" else "tags: [lora, kubetune]",
        "---",
        "",
        f"# LoRA adapter for {base}",
        "",
        f"Fine-tuned with kubetune ({cfg.method}, LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, "
        f"targets {', '.join(cfg.lora.target_modules)}) on `{cfg.dataset.uri}` "
        f"(template {cfg.dataset.template}, max {cfg.dataset.max_seq_length} tokens).",
        "",
        f"- optimizer steps: {metrics['steps']}, tokens trained on: {metrics['tokens']}",
        f"- final training loss: {metrics['final_loss']}",
    ]
    if metrics.get("eval_loss") is not None:
        lines.append(f"- validation loss: {metrics['eval_loss']:.4f}")
    em = metrics.get("exact_match")
    if em:
        before = (em.get("before") or {}).get("exact_match")
        lines.append(
            f"- exact match on {em['after']['examples']} held-out examples: "
            f"{'n/a' if before is None else f'{before:.2f}'} (base model) → {em['after']['exact_match']:.2f}"
        )
    lines += [
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "<this folder>")',
        "```",
        "",
        "![loss curve](loss_curve.png)",
        "",
    ]
    return "\n".join(lines)


def export(
    cfg, model, tokenizer, result, workdir: Path, model_path: str, weights: dict | None = None
) -> dict:
    """Write everything locally, upload it, return status.adapter {uri, sha256, sizeBytes}.
    `weights`: the LoRA weights gathered whole when the model is sharded (fsdp)."""
    out = workdir / "output"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), state_dict=weights)
    tokenizer.save_pretrained(str(out))
    history = result.metrics.get("history", [])
    tail = history[-10:]
    metrics = {
        "steps": result.step,
        "tokens": result.metrics.get("tokens", 0),
        "final_loss": round(sum(loss for _, loss in tail) / len(tail), 4) if tail else None,
        "eval_loss": result.metrics.get("eval_loss"),
        "exact_match": result.metrics.get("exact_match"),
        "train_seconds_this_attempt": result.metrics.get("train_seconds"),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    plot_loss_curve(history, metrics["eval_loss"], out / "loss_curve.png")
    (out / "README.md").write_text(model_card(cfg, metrics))
    if cfg.output.merged_model:
        _merge(cfg, out, model_path)
    store = open_store(cfg.output.uri)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    # the adapter weights last: their presence means the upload is complete
    files.sort(key=lambda p: p.name == "adapter_model.safetensors")
    for p in files:
        store.put_file(p, p.relative_to(out).as_posix())
    adapter = out / "adapter_model.safetensors"
    info = {
        "uri": store.uri.rstrip("/") + "/",
        "sha256": sha256_file(adapter),
        "sizeBytes": adapter.stat().st_size,
    }
    log.info("adapter uploaded to %s (%d files, %.1f MB)", info["uri"], len(files), info["sizeBytes"] / 1e6)
    return info


def _merge(cfg, out: Path, model_path: str) -> None:
    """The base model in its compute dtype (not quantized) with the adapter folded in."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = (
        torch.float32
        if cfg.quantization.compute_dtype in ("auto", "float32")
        else getattr(torch, cfg.quantization.compute_dtype)
    )
    base = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    merged.save_pretrained(str(out / "merged"), safe_serialization=True)
    log.info("merged model written to %s", out / "merged")
