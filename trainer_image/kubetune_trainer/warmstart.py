"""Warm start (lora.initFrom): a fresh run begins from an existing adapter's weights.

The source folder comes from a bucket others may write to: its weights load through
safetensors only, its files land inside the run's folder only, and the weights must
have the sha256 the job pinned (or that the source's _COMPLETE.json lists). A source
made for another base or another adapter shape is refused before training starts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kubetune_trainer.checkpoints import RunMismatch, sha256_file
from kubetune_trainer.library import ADAPTER_CONFIG_FILE, RECORD_FILE, WEIGHTS_FILE, lora_shape
from kubetune_trainer.storage import inside, missing, open_store

log = logging.getLogger("kubetune.warmstart")
COMPLETE = "_COMPLETE.json"


class InitMismatch(RunMismatch):
    """The initFrom adapter cannot start this run: a configuration error, not retried."""


def fetch_source(init, dest: Path) -> tuple[Path, dict]:
    """Download the source adapter's weights, config and record into dest; check the
    weights' sha256. Returns (folder, its adapter.json record or {})."""
    if not init.uri:
        raise InitMismatch(
            "lora.initFrom.adapter names an Adapter object, which the operator resolves; "
            "outside a cluster give lora.initFrom.uri (the adapter's folder)"
        )
    store = open_store(init.uri)
    expected = init.sha256
    if expected is None:
        try:
            expected = json.loads(store.read_bytes(COMPLETE))["files"][WEIGHTS_FILE]
        except Exception as e:
            if missing(e) or isinstance(e, (KeyError, ValueError, TypeError)):
                raise InitMismatch(
                    f"lora.initFrom.uri {init.uri} holds no finished adapter ({COMPLETE} with the sha256 of "
                    f"{WEIGHTS_FILE} is missing); set lora.initFrom.sha256 to use it anyway"
                ) from e
            raise
    dest.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, ADAPTER_CONFIG_FILE):
        try:
            store.download(name, inside(dest, name))
        except Exception as e:
            if missing(e):
                raise InitMismatch(f"lora.initFrom.uri {init.uri} has no {name}") from e
            raise
    actual = sha256_file(dest / WEIGHTS_FILE)
    if actual != expected:
        raise InitMismatch(
            f"lora.initFrom: {init.uri}{WEIGHTS_FILE} has sha256 {actual}, not {expected}: the adapter "
            "changed after it was registered; it is not used (kubetune adapters verify shows which)"
        )
    record = {}
    try:
        record = json.loads(store.read_bytes(RECORD_FILE))
    except Exception as e:
        if not missing(e):
            log.warning("initFrom: %s unreadable (%s): the base is not compared", RECORD_FILE, e)
    return dest, record if isinstance(record, dict) else {}


def check_source(folder: Path, record: dict, model, base_fingerprint: str | None) -> None:
    """Refuse a source adapter of another shape or base than the model just built."""
    try:
        source_r, source_targets = lora_shape(json.loads((folder / ADAPTER_CONFIG_FILE).read_text()))
    except ValueError as e:  # (json's decode errors are ValueErrors too)
        raise InitMismatch(
            f"lora.initFrom: the source adapter's {ADAPTER_CONFIG_FILE} is unusable: {e}"
        ) from e
    mine = model.peft_config["default"]
    mine_targets = mine.target_modules
    mine_targets = frozenset([mine_targets] if isinstance(mine_targets, str) else mine_targets)
    if source_r != mine.r or source_targets != mine_targets:
        raise InitMismatch(
            f"lora.initFrom: the source adapter has rank {source_r} on {sorted(source_targets)}, this run "
            f"has rank {mine.r} on {sorted(mine_targets)}; set lora.r and lora.targetModules to the source's"
        )
    base = record.get("base")
    recorded = base.get("fingerprint") if isinstance(base, dict) else None
    if isinstance(recorded, str) and base_fingerprint and recorded != base_fingerprint:
        raise InitMismatch(
            "lora.initFrom: the source adapter was trained on another base model (its fingerprint "
            f"{recorded[:16]} is not this base's {base_fingerprint[:16]})"
        )


def apply_source(model, folder: Path) -> int:
    """Load the source weights into the (not yet wrapped) peft model; returns how many
    tensors were loaded. Every LoRA tensor of the model must be in the source."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / WEIGHTS_FILE))
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # a shape differs
        raise InitMismatch(f"lora.initFrom: the source adapter's tensors do not fit this model: {e}") from e
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing_lora = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing_lora:
        raise InitMismatch(
            "lora.initFrom: the source adapter's tensors do not match this model's adapter "
            f"({len(unexpected)} unexpected, {len(missing_lora)} missing, e.g. "
            f"{(unexpected + missing_lora)[0]})"
        )
    return len(weights)
