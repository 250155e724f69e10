"""What a finished run leaves at output.uri: the adapter (adapter_model.safetensors +
adapter_config.json, loadable with peft's PeftModel.from_pretrained), the tokenizer,
training metrics, a loss-curve PNG and a short model card; optionally the merged model;
and, written last, _COMPLETE.json listing every file's sha256 (see publish)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from pathlib import Path

from kubetune_trainer.checkpoints import sha256_file
from kubetune_trainer.goodput import summary_line
from kubetune_trainer.library import (
    RECORD_FILE,
    WEIGHTS_FILE,
    adapter_record,
    clip_samples,
    record_json,
)
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


def loadable_base(cfg) -> str:
    """What from_pretrained takes for the base: a Hub id or a local folder (never a URI)."""
    if cfg.model.name:
        return cfg.model.name
    uri = cfg.model.uri
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return f"<a local copy of {uri}>"


# what ipex-llm's LoraConfig adds to adapter_config.json that stock peft does not know
# (it warns, then ignores them)
IPEX_LLM_ONLY_KEYS = ("training_mode",)


def portable_adapter_config(config: dict) -> dict:
    """adapter_config.json as stock peft writes it."""
    return {k: v for k, v in config.items() if k not in IPEX_LLM_ONLY_KEYS}


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
        f"(template {cfg.dataset.template}, max {cfg.dataset.max_seq_length} tokens"
        + (f", compute dtype {metrics['compute_dtype']}" if metrics.get("compute_dtype") else "")
        + ").",
        "",
        f"- optimizer steps: {metrics['steps']}, tokens trained on: {metrics['tokens']}",
        f"- final training loss: {metrics['final_loss']}",
    ]
    if metrics.get("eval_loss") is not None:
        lines.append(f"- validation loss: {metrics['eval_loss']:.4f}")
    em = metrics.get("exact_match")
    if em:
        before = (em.get("before") or {}).get("exact_match")
        validation = cfg.dataset.validation
        split = f"`{validation.uri}`" if validation and validation.uri else "a held-out fraction of the data"
        trained_on = (
            "the 4-bit base it was trained on"
            if cfg.method == "qlora"
            else "the full-precision base it was trained on, as served"
        )
        lines.append(
            f"- exact match on {em['after']['examples']} held-out examples ({split}): "
            f"{'n/a' if before is None else f'{before:.2f}'} (base model) → {em['after']['exact_match']:.2f} "
            f"(on {trained_on})"
        )
        unq = em.get("after_unquantized_base")
        if unq:
            lines.append(f"- the same adapter on the {unq['base']} base: {unq['exact_match']:.2f}")
    if metrics.get("goodput"):
        lines.append(f"- {summary_line(metrics['goodput'])}")
    lines += [
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'base = AutoModelForCausalLM.from_pretrained("{loadable_base(cfg)}")',
        'model = PeftModel.from_pretrained(base, "<this folder>")',
        "```",
    ]
    if cfg.method == "qlora" and metrics.get("low_bit"):  # ipex-llm
        lines += [
            "",
            f"Trained on the base quantized to 4 bits by ipex-llm ({metrics['low_bit']}): it reproduces "
            "the training-time outputs on that base (`ipex_llm.transformers.AutoModelForCausalLM"
            f'.from_pretrained(..., load_in_low_bit="{metrics["low_bit"]}")`) or on its weights dequantized; '
            "on the unquantized base it differs by that quantization's error.",
        ]
    elif cfg.method == "qlora":
        lines += [
            "",
            "Trained on the base quantized to 4 bits "
            f"({cfg.quantization.type}): it reproduces the training-time outputs on that base "
            "(`BitsAndBytesConfig(load_in_4bit=True, "
            f'bnb_4bit_quant_type="{cfg.quantization.type}")`) or on `merged/` when exported '
            "(the dequantized 4-bit weights with the adapter folded in); on the unquantized base it "
            "scores as stated above.",
        ]
    elif cfg.method == "lora":
        dtype = metrics.get("compute_dtype")
        lines += [
            "",
            "Trained on the full-precision base"
            + (f" ({dtype})" if dtype else "")
            + ": load it on that base as above, or merge it (`model.merge_and_unload()`); "
            "either gives the outputs measured above. A 4-bit base would change them.",
        ]
    lines += ["", "![loss curve](loss_curve.png)", ""]
    return "\n".join(lines)


def evaluation_summary(cfg, metrics: dict) -> dict | None:
    """status.evaluation (camelCase, small: it travels in the termination message), from
    the run's metrics (Result.metrics or metrics.json: the same keys)."""
    em = metrics.get("exact_match") or {}
    validation = cfg.dataset.validation
    if not validation or (not em and metrics.get("eval_loss") is None):
        return None
    out = {
        "split": validation.uri or f"a fraction {validation.fraction:g} of {cfg.dataset.uri}",
        "examples": (em.get("after") or {}).get("examples"),
        "exactMatchBefore": (em.get("before") or {}).get("exact_match"),
        "exactMatch": (em.get("after") or {}).get("exact_match"),
        "exactMatchUnquantizedBase": (em.get("after_unquantized_base") or {}).get("exact_match"),
        "evalLoss": None if metrics.get("eval_loss") is None else round(metrics["eval_loss"], 4),
        "samples": clip_samples((em.get("after") or {}).get("samples")) or None,
    }
    return {k: v for k, v in out.items() if v is not None}


def export(
    cfg,
    model,
    tokenizer,
    result,
    workdir: Path,
    model_path: str,
    weights: dict | None = None,
    backend: str = "cpu",
    record: dict | None = None,
) -> dict:
    """Write everything locally, upload it, return status.adapter {uri, sha256, sizeBytes}.
    `weights`: the LoRA weights gathered whole when the model is sharded (fsdp); `record`:
    adapter_record()'s keyword arguments (lineage, evaluation, goodput, source), written
    as adapter.json with the rest (kubetune_trainer.library)."""
    out = workdir / "output"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), state_dict=weights)
    if backend == "ipex-llm":
        config_file = out / "adapter_config.json"
        config_file.write_text(
            json.dumps(portable_adapter_config(json.loads(config_file.read_text())), indent=2)
        )
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
        "compute_dtype": result.metrics.get("compute_dtype"),
        "low_bit": result.metrics.get("low_bit"),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    plot_loss_curve(history, metrics["eval_loss"], out / "loss_curve.png")
    (out / "README.md").write_text(model_card(cfg, metrics))
    if cfg.output.merged_model:
        _merge(cfg, out, model_path, metrics["compute_dtype"] or "float32", backend)
    store = open_store(cfg.output.uri)
    adapter = out / WEIGHTS_FILE
    info = {
        "uri": store.uri.rstrip("/") + "/",
        "sha256": sha256_file(adapter),
        "sizeBytes": adapter.stat().st_size,
    }
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    (out / RECORD_FILE).write_text(
        record_json(adapter_record(cfg, info, steps=result.step, created=created, **(record or {})))
    )
    files = publish(store, out)
    if files[WEIGHTS_FILE] != info["sha256"]:
        raise RuntimeError(f"{adapter} changed while it was uploaded")
    log.info("adapter uploaded to %s (%d files, %.1f MB)", info["uri"], len(files), info["sizeBytes"] / 1e6)
    return info


COMPLETE = "_COMPLETE.json"
STAGING = ".staging"


def publish(store, folder: Path) -> dict[str, str]:
    """Upload folder to the store so that no reader takes half of it for the adapter:
    every file goes to a staging prefix first; then the completion marker (a manifest of
    every file's sha256) is removed, the files are copied into place server-side, and the
    marker is written again last. A reader that finds the marker finds the whole set it
    lists; an upload cut short leaves no marker. Returns {file: sha256}."""
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }
    staging = f"{STAGING}/{uuid.uuid4().hex[:12]}"
    for name in files:
        store.put_file(folder / name, f"{staging}/{name}")
    store.delete([COMPLETE])
    for name in sorted(files, key=lambda n: n == "adapter_model.safetensors"):
        store.copy(f"{staging}/{name}", name)
    marker = {"files": files, "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    store.put_bytes(COMPLETE, json.dumps(marker, indent=1).encode())
    store.delete([f"{staging}/{name}" for name in files])
    return files


def merged_model(cfg, adapter_dir: Path, model_path: str, dtype_name: str, backend: str = "cpu"):
    """The base with the adapter folded in, reproducing what training saw. For qlora that
    is the 4-bit base dequantized (QLoRA's merge), not the original weights: the adapter
    learned to correct the quantized ones, and on the original weights it scores lower."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.model import device_for, quantization_config

    dtype = getattr(torch, dtype_name)
    common = {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.method == "qlora":
        base = AutoModelForCausalLM.from_pretrained(
            model_path,
            quantization_config=quantization_config(cfg, dtype, backend),
            dtype=dtype,
            device_map={"": device_for(backend)},
            **common,
        )
        base = base.dequantize(dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **common)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _merge(cfg, out: Path, model_path: str, dtype_name: str, backend: str) -> None:
    merged = merged_model(cfg, out, model_path, dtype_name, backend)
    merged.save_pretrained(str(out / "merged"), safe_serialization=True)
    log.info("merged model (%s) written to %s", dtype_name, out / "merged")
