"""Held-out generation: greedy answers for validation prompts and their exact match with
the reference, before training and after — the number a user of a text-to-SQL or
classification fine-tune actually cares about."""

from __future__ import annotations

import logging
import time

from kubetune_trainer.data import Record
from kubetune_trainer.templates import RecordError, render

log = logging.getLogger("kubetune.evaluate")


def normalize(text: str) -> str:
    """Whitespace and a trailing ';' do not make an answer wrong."""
    return " ".join(text.strip().rstrip(";").split())


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(
        references
    )


def prompts_and_references(records: list[Record], dataset_cfg, tokenizer) -> tuple[list[str], list[str]]:
    prompts, refs = [], []
    for r in records:
        try:
            p, ref = render(r.data, dataset_cfg.template, dataset_cfg.fields, dataset_cfg.format, tokenizer)
        except (RecordError, ValueError):
            continue
        if p:  # nothing to generate from without a prompt
            prompts.append(p)
            refs.append(ref)
    return prompts, refs


def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 64
) -> list[str]:
    import torch

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues on the right
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    use_cache=True,
                )
            for row in gen[:, enc["input_ids"].shape[1] :]:
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return out


def exact_match(model, tokenizer, records: list[Record], dataset_cfg, label: str) -> dict:
    t0 = time.monotonic()
    prompts, refs = prompts_and_references(records, dataset_cfg, tokenizer)
    # room for the longest reference and a little more: a rambling base model is cut short
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs), default=0)
    preds = generate(model, tokenizer, prompts, max_new_tokens=longest + 8)
    rate = exact_match_rate(preds, refs)
    log.info(
        "exact match %s training: %.3f on %d held-out examples (%.0f s)",
        label,
        rate,
        len(refs),
        time.monotonic() - t0,
    )
    return {
        "exact_match": round(rate, 4),
        "examples": len(refs),
        "samples": [{"reference": r, "prediction": p} for r, p in list(zip(refs, preds, strict=True))[:5]],
        # what went wrong, for the model card and for choosing a recipe
        "misses": [
            {"prompt": q[-300:], "reference": r, "prediction": p}
            for q, r, p in zip(prompts, refs, preds, strict=True)
            if normalize(p) != normalize(r)
        ][:10],
    }
