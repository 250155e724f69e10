"""The training loop: flat on purpose. Read it top to bottom:

  set up → resume from the newest verified checkpoint → for each optimizer step:
  gather this rank's micro-batches, count the loss tokens of the whole step (all ranks),
  forward/backward, clip, step → log, evaluate, checkpoint → stop cleanly on SIGTERM at a
  step boundary → export the adapter.

The loss of a step is the sum over all its label tokens divided by their number across
every micro-batch and rank, so gradient accumulation and the number of workers do not
change the result (only the summation order)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubetune_trainer.checkpoints import CheckpointStore, Fenced, Restored, RunMismatch
from kubetune_trainer.config import RUN_FIELDS, TrainingConfig
from kubetune_trainer.data import RecordStream, in_validation, list_shards
from kubetune_trainer.goodput import Ledger, summary_line
from kubetune_trainer.library import base_fingerprint, data_fingerprint
from kubetune_trainer.progress import ProgressServer, Rate, eta_seconds
from kubetune_trainer.sequences import IGNORE, SequenceStream, collate, label_tokens, make_encoder
from kubetune_trainer.signals import CheckpointRequest, StartSignal, StopFlag
from kubetune_trainer.storage import open_store

log = logging.getLogger("kubetune.train")

MAX_EVAL_EXAMPLES = 256
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"


class Preempted(Exception):
    """Stopped on request; a checkpoint for `step` is committed."""

    def __init__(self, step: int, checkpoint: dict | None) -> None:
        super().__init__(f"stopped at step {step}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ=os.environ) -> Dist:
        return cls(
            int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0))
        )

    @property
    def main(self) -> bool:
        return self.rank == 0


def deal(seqs, world: int, rank: int):
    """Deal the global sequence stream round-robin: each rank keeps one sequence of every
    `world` in a row and reads past the others, so after every deal all ranks stand at
    the same point of the stream. Ranks never overlap, nothing is skipped, and one data
    state (rank 0's) is every rank's: a checkpoint resumes any world size exactly."""
    it = iter(seqs)
    while True:
        group = list(itertools.islice(it, world))
        if len(group) < world:
            return
        yield group[rank][1]


@dataclass
class Result:
    step: int
    checkpoint: dict | None = None
    metrics: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the training draws from, as plain JSON: a checkpoint holds no pickle."""
    import numpy as np
    import torch

    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def local_base_fingerprint(path: str, revision: str | None) -> str | None:
    """The base model's fingerprint (kubetune_trainer.library.base_fingerprint), from its
    folder, or from the Hub cache for a Hub id (None when nothing is cached locally)."""
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, revision=revision, local_files_only=True))
        except Exception:
            return None
    return base_fingerprint(folder)


def run_fingerprint(cfg: TrainingConfig) -> str:
    """A hash of what makes a run (RUN_FIELDS): a checkpoint resumed under another model,
    data or adapter shape would train something else silently."""
    import hashlib

    parts = cfg.model_dump(mode="json", include=set(RUN_FIELDS))
    if parts["lora"].get("init_from") is None:
        # (a field added later: without a warm start, the hash of runs made before it)
        parts["lora"].pop("init_from", None)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read_checkpoint(folder: Path) -> dict:
    """A verified checkpoint's contents, read as data only. The files come from a bucket
    others may write to, and the manifest's hashes sit beside them: tensors load through
    safetensors or torch's weights-only unpickler, everything else is JSON, so a planted
    pickle raises here (and the checkpoint is skipped) instead of running."""
    import torch
    from safetensors.torch import load_file

    return {
        "weights": load_file(str(folder / ADAPTER_FILE)),
        "optimizer": torch.load(folder / "optimizer.pt", weights_only=True),
        "scheduler": json.loads((folder / "scheduler.json").read_text()),
        "rng": json.loads((folder / "rng.json").read_text()),
        "state": json.loads((folder / STATE_FILE).read_text()),
    }


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def warmup_steps(ratio: float, total: int) -> int:
    return math.ceil(ratio * total)


def lm_loss(model, batch: dict, num_items, sparse_logits: bool):
    """Summed next-token cross-entropy over label tokens ÷ num_items (the whole step's).

    sparse_logits: compute logits only where a label follows (transformers' boolean
    logits_to_keep). With the loss on responses only, that skips most of the LM head —
    for a 49k-vocabulary 135M model, most of the compute. Same value as the model's own
    loss; the fallback (older transformers, other architectures) lets the model do it."""
    import torch

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not sparse_logits:
        return model(**inputs, labels=labels, num_items_in_batch=num_items, use_cache=False).loss
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][keep[:, :-1]]
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets, reduction="sum"
    )
    return loss / num_items


def supports_sparse_logits(model) -> bool:
    """transformers >= 5 takes a boolean logits_to_keep for the usual decoder models."""
    import inspect

    import transformers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    major = int(transformers.__version__.split(".")[0])
    return major >= 5 and "logits_to_keep" in inspect.signature(base.forward).parameters


class Trainer:
    def __init__(
        self,
        cfg: TrainingConfig,
        stop: StopFlag | None = None,
        progress: ProgressServer | None = None,
        dist: Dist | None = None,
        workdir: Path | None = None,
        environ=os.environ,
        checkpoint_request: CheckpointRequest | None = None,
        process_start: float | None = None,
        start_signal: StartSignal | None = None,
    ) -> None:
        self.cfg, self.environ = cfg, environ
        self.stop = stop if stop is not None else StopFlag()  # (a StopFlag not set is falsy)
        # a checkpoint asked for from outside (POST /checkpoint: a node's termination notice)
        self.requested = checkpoint_request if checkpoint_request is not None else CheckpointRequest()
        # a standby's go (POST /start); None: not a standby, resume at once
        self.start_signal = start_signal
        # (wall clock: the goodput ledger compares times of attempts on different nodes)
        self.process_start = process_start if process_start is not None else time.time()
        self.dist = dist or Dist.from_env(environ)
        self.progress = progress or ProgressServer(None, rank=self.dist.rank)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kubetune-train-"))
        self.cache = Path(environ.get("KUBETUNE_CACHE", self.workdir / "cache"))
        self.trace_path = environ.get("KUBETUNE_SAMPLE_TRACE")  # tests: which samples each step used
        self.step_log: list[tuple[float, int]] = []  # (end time, this rank's non-padding tokens) per step
        self.checkpoint_pauses: list[float] = []  # seconds the loop stood still for each periodic checkpoint

    # -- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        import torch

        from kubetune_trainer.model import load_tokenizer, model_dir, pick_backend

        cfg = self.cfg
        self.backend = pick_backend(self.environ)
        self.progress.update(phase="loading", total_steps=cfg.training.max_steps)
        if self.dist.world > 1:
            self._init_process_group(torch)
        # the data first: a wrong prefix fails in a second, not after loading a 7B model
        shards = list_shards(open_store(cfg.dataset.uri))
        self.model_path = path = model_dir(cfg.model, self.cache)
        # what the adapter record names as this run's base and data (kubetune_trainer.library)
        self.lineage = {
            "base": local_base_fingerprint(path, cfg.model.revision),
            "data": data_fingerprint([(o.key, o.etag) for o in shards]),
            "shards": len(shards),
        }
        self.tokenizer = load_tokenizer(path, cfg.model)
        seed_everything(cfg.training.seed)  # LoRA init is drawn from it
        t0 = time.monotonic()
        agree = None
        if self.dist.world > 1:  # (only asked on CPU, where the group is gloo's)

            def agree(flag: bool) -> bool:
                t = torch.tensor([int(flag)])
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
                return bool(t.item())

        # the newest checkpoint before the model: a resumed run computes in the dtype of the
        # run it resumes (auto's CPU probe could choose otherwise on a busier machine)
        self.ckpts = CheckpointStore(
            open_store(cfg.checkpoint.uri),
            cfg.checkpoint.keep,
            self.workdir / "ckpt",
            attempt=int(os.environ.get("KUBETUNE_ATTEMPT") or 0),
            on_commit=self._committed,
        )
        self.fingerprint = run_fingerprint(cfg)
        # a standby reads the newest checkpoint so far for its compute dtype only: it claims
        # nothing, and resumes from whatever is newest once it is told to go
        standby = self.start_signal is not None
        self._find_restore_point(claim=not standby)
        self._build_model(torch, path, agree, t0)
        if standby:
            self._stand_by(torch, path, agree)

    def _find_restore_point(self, claim: bool) -> None:
        """The newest good checkpoint (self.restored), refused if another run made it; with
        claim, this attempt takes the prefix (an older attempt still running stops writing)."""
        cfg = self.cfg
        self.restored = self.ckpts.latest(read=read_checkpoint)
        if self.restored:
            made_by = self.restored.contents["state"].get("run")
            if made_by != self.fingerprint:
                raise RunMismatch(
                    f"the checkpoints under {cfg.checkpoint.uri} were made by another run (a different "
                    "model, dataset, method, lora or quantization): resuming them would train something "
                    "else; give this run its own checkpoint.uri"
                )
        if claim and self.dist.main:
            self.ckpts.claim()

    def _resumed_dtype(self) -> str | None:
        return self.restored.contents["state"].get("compute_dtype") if self.restored else None

    def _stand_by(self, torch, path: Path, agree) -> None:
        """Hold the loaded model until POST /start (the attempt this one replaces has
        stopped), then take the newest checkpoint; a SIGTERM meanwhile stops it with
        nothing to save. The model is loaded again only if that checkpoint computes in
        another dtype than the one loaded."""
        loaded = str(self.compute_dtype).removeprefix("torch.")
        self.progress.update(phase="standby")
        since = time.monotonic()
        log.info("standing by, model loaded: resuming once told to (POST /start)")
        while not self.start_signal.wait(0.2):
            if self.stop:
                raise Preempted(0, None)
        # its restart is what came after the go; before it, it overlapped the last attempt
        self.process_start = self.start_signal.at
        log.info("told to start after %.1f s standing by", time.monotonic() - since)
        self.progress.update(phase="loading")
        self._find_restore_point(claim=True)
        if self._resumed_dtype() not in (None, loaded):
            log.info(
                "the newest checkpoint computes in %s, not %s: loading again", self._resumed_dtype(), loaded
            )
            self._build_model(torch, path, agree, time.monotonic())

    def _build_model(self, torch, path: Path, agree, t0: float) -> None:
        """The model (in the restore point's dtype), its optimizer and scheduler."""
        from kubetune_trainer.model import load_model, resolve_compute_dtype

        cfg = self.cfg
        self.compute_dtype = resolve_compute_dtype(
            cfg, self.backend, self.dist.local_rank, agree, resumed=self._resumed_dtype()
        )
        self.model = load_model(cfg, self.backend, path, self.dist.local_rank, self.compute_dtype)
        if cfg.lora.init_from and not self.restored:
            self._warm_start()
        self.device = next(p.device for p in self.model.parameters() if p.requires_grad)
        # the 4-bit format ipex-llm quantized the base to on that device (the model card names it)
        self.low_bit = None
        if self.backend == "ipex-llm":
            from kubetune_trainer.model import ipex_llm_low_bit

            self.low_bit = ipex_llm_low_bit(cfg.quantization.type, on_xpu=self.device.type == "xpu")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info(
            "model %s loaded on %s (backend %s, compute dtype %s) in %.1f s; %.2fM trainable LoRA parameters",
            cfg.model.name or cfg.model.uri,
            self.device,
            self.backend,
            str(self.compute_dtype).removeprefix("torch."),
            time.monotonic() - t0,
            trainable / 1e6,
        )
        self.ddp_model = self.model
        # fsdp: the base model's weights are split over the ranks; collectives then also
        # run in checkpoints, evaluation and export, so every rank takes part in those
        self.sharded = self.dist.world > 1 and cfg.training.strategy == "fsdp"
        if self.sharded:
            from kubetune_trainer.model import shard_model

            shard_model(self.model)
        elif self.dist.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model)
        t = cfg.training
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(t.optimizer, params, t.learning_rate, t.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            t.scheduler,
            self.optimizer,
            num_warmup_steps=warmup_steps(t.warmup_ratio, t.max_steps),
            num_training_steps=t.max_steps,
        )
        self.encode = make_encoder(self.tokenizer, cfg.dataset)
        self.sparse_logits = supports_sparse_logits(self.model)

    def _warm_start(self) -> None:
        """lora.initFrom: the source adapter's weights in place of a fresh adapter (a
        resumed run has its own in the checkpoint instead)."""
        from kubetune_trainer.warmstart import apply_source, check_source, fetch_source

        init = self.cfg.lora.init_from
        folder, record = fetch_source(init, self.workdir / "init-from")
        check_source(folder, record, self.model, self.lineage.get("base"))
        loaded = apply_source(self.model, folder)
        log.info("warm start: %d adapter tensors from %s", loaded, init.adapter or init.uri)

    @property
    def shares_rank0_work(self) -> bool:
        """Whether this rank takes part in checkpoints, evaluation and the final gather:
        rank 0 does them; under fsdp every rank does (its gathers and forward passes are
        collectives), and only rank 0 writes."""
        return self.dist.main or self.sharded

    def _init_process_group(self, torch) -> None:
        from kubetune_trainer.model import on_cpu

        # gloo on CPUs, ipex-llm's included (its oneCCL bindings are Intel GPU builds)
        backend = (
            "gloo"
            if on_cpu(self.backend)
            else {"cuda-bnb": "nccl", "xpu-bnb": "xccl", "ipex-llm": "ccl"}[self.backend]
        )
        if self.backend == "cuda-bnb":
            torch.cuda.set_device(self.dist.local_rank)
        if backend == "ccl":  # the ipex-llm image's oneCCL: registers the backend on import
            import oneccl_bindings_for_pytorch  # noqa: F401
        torch.distributed.init_process_group(backend=backend)
        log.info("rank %d of %d joined (%s)", self.dist.rank, self.dist.world, backend)

    def record_stream(self) -> RecordStream:
        ds = self.cfg.dataset
        fraction = ds.validation.fraction if ds.validation else None
        return RecordStream(
            open_store(ds.uri),
            seed=self.cfg.training.seed,
            shuffle=ds.shuffle,
            keep=lambda r: not in_validation(r.sample_id, fraction),
            max_bad_fraction=ds.max_bad_records,
        )

    def eval_records(self) -> list:
        ds = self.cfg.dataset
        if not ds.validation:
            return []
        if ds.validation.uri:
            stream = RecordStream(open_store(ds.validation.uri), seed=0, shuffle=False, epochs=1)
        else:
            fraction = ds.validation.fraction
            stream = RecordStream(
                open_store(ds.uri),
                seed=0,
                shuffle=False,
                epochs=1,
                keep=lambda r: in_validation(r.sample_id, fraction),
            )
        out = []
        for record in stream:
            out.append(record)
            if len(out) >= MAX_EVAL_EXAMPLES:
                break
        return out

    def encoded(self, records) -> list:
        out = []
        for record in records:
            with contextlib.suppress(ValueError):
                out.append(self.encode(record))
        return out

    def exact_match(self, records, label: str) -> dict | None:
        from kubetune_trainer.evaluate import exact_match
        from kubetune_trainer.model import dense_4bit_layers

        n = self.cfg.dataset.validation.generate if self.cfg.dataset.validation else 0
        if not n or not records:
            return None
        dense = self.backend == "cpu" and self.cfg.method == "qlora" and not self.sharded
        with (
            self.progress.phase_while("evaluating"),
            dense_4bit_layers(self.model) if dense else contextlib.nullcontext(),
        ):
            return exact_match(self.model, self.tokenizer, records[:n], self.cfg.dataset, label)

    def exact_match_unquantized(self, records) -> dict | None:
        """The adapter on the base model as users usually serve it: not quantized, in the
        compute dtype (PeftModel.from_pretrained on the plain base). A QLoRA adapter learned
        on the 4-bit weights; this says what that costs. None where it does not apply."""
        if self.cfg.method != "qlora" or self.backend == "ipex-llm" or self.sharded or not self.dist.main:
            return None
        import copy
        import gc

        import torch
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
        from transformers import AutoModelForCausalLM

        from kubetune_trainer.evaluate import exact_match

        n = self.cfg.dataset.validation.generate if self.cfg.dataset.validation else 0
        if not n or not records:
            return None
        try:
            base = AutoModelForCausalLM.from_pretrained(
                self.model_path,
                dtype=self.compute_dtype,
                device_map={"": self.device},
                revision=self.cfg.model.revision,
                trust_remote_code=self.cfg.model.trust_remote_code,
            )
            served = get_peft_model(base, copy.deepcopy(self.model.peft_config["default"]))
            set_peft_model_state_dict(served, get_peft_model_state_dict(self.model))
            result = exact_match(
                served, self.tokenizer, records[:n], self.cfg.dataset, "after (unquantized base)"
            )
        except torch.OutOfMemoryError:
            log.warning("no room for the unquantized base next to the 4-bit one: not evaluated on it")
            return None
        except Exception as e:  # a side measurement: never lose the trained adapter over it
            log.warning("not evaluated on the unquantized base: %s: %s", type(e).__name__, e)
            return None
        finally:
            served = base = None
            gc.collect()
        result["base"] = f"unquantized, {str(self.compute_dtype).removeprefix('torch.')}"
        return result

    # -- checkpoints ---------------------------------------------------------------------
    def trainable_state(self) -> dict | None:
        """Under fsdp, the LoRA weights gathered whole under the model's own parameter
        names (a collective; rank 0 gets them). None otherwise: read the model itself."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        full = get_model_state_dict(self.model, options=options)
        return full if self.dist.main else None

    def optimizer_state(self) -> dict | None:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return full if self.dist.main else None

    def save_checkpoint(self, step: int, data_state: dict, history: list, wait: bool) -> dict:
        """Rank 0 writes and commits; under fsdp every rank calls this (the gathers are
        collectives). Every rank returns the same reference."""
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        ref = {
            "step": step,
            "uri": self.ckpts.uri(step),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        trainable, optimizer = self.trainable_state(), self.optimizer_state()
        if not self.dist.main:
            return ref
        folder = self.ckpts.local_dir(step)
        adapter = get_peft_model_state_dict(self.model, state_dict=trainable)
        weights = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
        save_file(weights, str(folder / ADAPTER_FILE))
        torch.save(optimizer, folder / "optimizer.pt")
        (folder / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
        (folder / "rng.json").write_text(json.dumps(rng_state()))
        state = {
            "step": step,
            "data": data_state,
            "history": history,
            "tokens": self.tokens_seen,
            "exact_match_before": self.exact_match_before,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "run": self.fingerprint,
            "goodput": self.ledger.to_state(),
        }
        (folder / STATE_FILE).write_text(json.dumps(state))
        if wait:  # (a periodic checkpoint's caller marks the loop's pause for it)
            self.progress.update(phase="checkpointing")
        self.ckpts.commit(step, folder, wait=wait)
        self.progress.c_ckpt.inc()
        return ref

    def _committed(self, ref: dict) -> None:
        """A checkpoint now exists for a reader: the status shows it (the upload thread)."""
        self.progress.update(last_checkpoint_step=ref["step"], last_checkpoint=ref)

    def restore(self, restored: Restored) -> dict:
        from peft import set_peft_model_state_dict

        contents = restored.contents
        weights, optimizer = contents["weights"], contents["optimizer"]
        if self.sharded:
            # every rank read the whole checkpoint; each keeps its own shard of it
            from peft.utils.save_and_load import _insert_adapter_name_into_state_dict
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            named = _insert_adapter_name_into_state_dict(weights, "default", "lora_")
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, named, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=options)
        else:
            set_peft_model_state_dict(self.model, weights)
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(contents["scheduler"])
        set_rng_state(contents["rng"])
        shutil.rmtree(restored.folder, ignore_errors=True)
        return contents["state"]

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> Result:
        import torch

        cfg, t = self.cfg, self.cfg.training
        self.setup()
        step, history, data_state, last_ckpt = 0, [], None, None
        self.tokens_seen, self.exact_match_before = 0, None
        restored = self.restored
        state = None
        if restored:
            state = self.restore(restored)
            step, history, data_state = state["step"], state["history"], state["data"]
            self.tokens_seen = state.get("tokens", 0)
            self.exact_match_before = state.get("exact_match_before")
            last_ckpt = {"step": step, "uri": restored.uri}
            log.info("resumed from %s (step %d)", restored.uri, step)
            self.progress.update(
                resumed_from_step=step,
                last_checkpoint_step=step,
                last_checkpoint={"step": step, "uri": restored.uri},
            )
        records = self.record_stream()
        seqs = (
            SequenceStream.restore(
                records, self.encode, cfg.dataset.max_seq_length, cfg.dataset.packing, data_state
            )
            if data_state
            else SequenceStream(records, self.encode, cfg.dataset.max_seq_length, cfg.dataset.packing)
        )
        mine = deal(seqs, self.dist.world, self.dist.rank)
        # evaluation is rank 0's, or everyone's under fsdp (a forward pass is a collective)
        held_out = self.eval_records() if self.shares_rank0_work else []
        eval_set = self.encoded(held_out)
        if not restored and held_out:
            # the base model's score (LoRA B starts at zero, so this is the base model)
            self.exact_match_before = self.exact_match(held_out, "before")
        pad_id = self.tokenizer.pad_token_id
        self.ledger = self._ledger(state, step)
        self.progress.goodput_source = lambda: self.ledger.report(time.time())
        start_step, t_start, last_ckpt_time = step, time.monotonic(), time.monotonic()
        rate, window_loss, window_steps = Rate(), 0.0, 0
        self.ddp_model.train()
        # every step says where this rank is (/progress): reading data, or computing
        self.progress.update(phase="training", step=step, total_steps=t.max_steps, activity="compute")

        while step < t.max_steps:
            stop, requested = self._should_stop(torch)
            if stop:
                self.progress.set_activity(None)
                ckpt = self._stop_checkpoint(step, last_ckpt, seqs, history)
                # every rank waits for rank 0's commit and names the same checkpoint
                raise Preempted(step, self._from_rank0(ckpt))
            if requested:
                last_ckpt = self._requested_checkpoint(requested, step, last_ckpt, seqs, history)
            # (a step's time starts past the stop check: a rank waiting there for rank 0's
            # evaluation or checkpoint is not slow)
            self.progress.step_begins()
            # one optimizer step: this rank's micro-batches, then the global loss-token count
            micro = []
            self.progress.set_activity("data")
            for _ in range(t.gradient_accumulation):
                batch_seqs = [next(mine) for _ in range(t.batch_size)]
                micro.append((collate(batch_seqs, pad_id, cfg.dataset.packing), batch_seqs))
            self.progress.set_activity("compute")
            n_tokens = sum(label_tokens(b) for b, _ in micro)
            global_tokens = self._all_sum(torch, n_tokens)
            step_loss = 0.0
            for i, (batch, _) in enumerate(micro):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                sync = i == len(micro) - 1 or self.dist.world == 1 or self.sharded
                with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                    loss = lm_loss(self.ddp_model, batch, global_tokens, self.sparse_logits)
                    # DDP averages gradients over ranks; the loss is already global
                    (loss * self.dist.world).backward()
                step_loss += loss.item()
            step_loss = self._all_sum(torch, step_loss)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], t.max_grad_norm
            )
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            self.ledger.step(self.progress.step_done(step) or 0.0, time.time())
            self.tokens_seen += int(global_tokens)
            self.progress.c_tokens.inc(int(global_tokens))
            real_tokens = sum(len(seq.input_ids) for _, seqs in micro for seq in seqs)
            rate.add(real_tokens * self.dist.world)
            self.step_log.append((time.monotonic(), real_tokens))
            history.append([step, round(step_loss, 6)])
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            self._trace(step, micro)

            if step % t.logging_steps == 0 or step == t.max_steps:
                elapsed = time.monotonic() - t_start
                fields = {
                    "step": step,
                    "total_steps": t.max_steps,
                    "loss": round(window_loss / window_steps, 4),
                    "learning_rate": self.scheduler.get_last_lr()[0],
                    "tokens_per_second": round(rate.take(), 1),
                    "epoch": records.state.epoch,
                    "eta_seconds": eta_seconds(step, t.max_steps, start_step, elapsed),
                }
                self.progress.update(**fields)
                if self.dist.main:
                    log.info(json.dumps({"event": "train", **fields}))
                window_loss, window_steps = 0.0, 0
            if t.eval_steps and step % t.eval_steps == 0 and step < t.max_steps and eval_set:
                self._evaluate(eval_set, pad_id, step)
            due = step % cfg.checkpoint.every_steps == 0 or (
                cfg.checkpoint.every_minutes is not None
                and time.monotonic() - last_ckpt_time >= cfg.checkpoint.every_minutes * 60
            )
            if self.sharded:
                due = self._all_sum(torch, int(due)) > 0  # clocks differ: agree, or the gather hangs
            if due and step < t.max_steps and self.shares_rank0_work:
                t_ckpt = time.monotonic()
                with self.progress.phase_while("checkpointing"):
                    last_ckpt = self.save_checkpoint(step, seqs.state(), history, wait=False)
                last_ckpt_time = time.monotonic()
                self.checkpoint_pauses.append(last_ckpt_time - t_ckpt)

        self.progress.set_activity(None)
        train_seconds = round(time.monotonic() - t_start, 1)
        eval_loss = self._evaluate(eval_set, pad_id, step) if eval_set else None
        after = self.exact_match(held_out, "after")
        result = Result(
            step=step,
            metrics={
                "eval_loss": eval_loss,
                "history": history,
                "train_seconds": train_seconds,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "low_bit": getattr(self, "low_bit", None),
            },
        )
        if after is not None:
            result.metrics["exact_match"] = {"before": self.exact_match_before, "after": after}
            with self.progress.phase_while("evaluating"):
                unquantized = self.exact_match_unquantized(held_out)
            if unquantized is not None:
                result.metrics["exact_match"]["after_unquantized_base"] = unquantized
        if self.shares_rank0_work:
            # a final checkpoint too: a retry after a failed export does not retrain
            if last_ckpt is None or last_ckpt["step"] != step:
                last_ckpt = self.save_checkpoint(step, seqs.state(), history, wait=True)
            if self.dist.main:
                self.ckpts.wait()
            result.checkpoint = last_ckpt
        # what export writes as the adapter (a gather under fsdp, so every rank's call)
        self.final_weights = self.trainable_state()
        result.metrics["goodput"] = self.ledger.report(time.time())
        if self.dist.main:
            log.info("%s", summary_line(result.metrics["goodput"]))
        return result

    def _ledger(self, state: dict | None, step: int) -> Ledger:
        """The job's goodput ledger: the resumed checkpoint's, carried into this attempt,
        or a new one (a first attempt, or a checkpoint from before ledgers)."""
        saved = Ledger.load(state.get("goodput")) if state else None
        if saved is None:
            return Ledger(started_at=self.process_start)
        seen = self.environ.get("KUBETUNE_LAST_SEEN_STEP", "")
        last_seen = int(seen) if seen.isdigit() else None
        attempt = self.environ.get("KUBETUNE_ATTEMPT", "")
        ledger = saved.resumed(
            step, self.process_start, time.time(), last_seen, int(attempt) if attempt.isdigit() else 0
        )
        log.info(json.dumps({"event": "goodput", "resumedFromStep": step, **ledger.report(time.time())}))
        return ledger

    def _requested_checkpoint(self, reason: str, step, last_ckpt, seqs, history) -> dict | None:
        """A checkpoint asked for from outside, at this step boundary, uploaded while
        training goes on (the SIGTERM that may follow waits for it)."""
        if step == 0 or (last_ckpt is not None and last_ckpt["step"] == step):
            if self.dist.main:
                log.info("checkpoint requested (%s): step %d is already saved", reason, step)
            self.requested.done()
            return last_ckpt
        if not self.shares_rank0_work:
            self.requested.done()
            return {"step": step, "uri": self.ckpts.uri(step)}
        if self.dist.main:
            self.ckpts.wait(raise_errors=False)  # one upload at a time; a failed one is logged
            log.info("checkpoint requested (%s): saving step %d", reason, step)
        ref = self.save_checkpoint(step, seqs.state(), history, wait=False)
        future = self.ckpts.in_flight if self.dist.main else None
        if future is None:
            self.requested.done()
        else:  # (runs at once if the upload is already done)
            future.add_done_callback(lambda _f: self.requested.done())
        return ref

    def _stop_checkpoint(self, step, last_ckpt, seqs, history) -> dict | None:
        """The SIGTERM checkpoint: nothing new to save if no step ran since the last one."""
        if not self.shares_rank0_work:
            return last_ckpt
        saved = last_ckpt is not None and last_ckpt["step"] == step
        # the upload in flight is last_ckpt's: if it failed (S3 away for longer than botocore's
        # retries), that step is not saved after all and this checkpoint must be written again
        if self.dist.main and not self.ckpts.wait(raise_errors=False):
            saved = False
        if self.sharded:  # every rank saves, or none (fsdp's gathers); under ddp rank 0 alone is here
            saved = self._from_rank0(saved)
        if saved or step == 0:
            if self.dist.main and step:
                log.info(
                    "stop requested (%s): checkpoint of step %d was already committed",
                    self.stop.signal_name,
                    step,
                )
            return last_ckpt
        t0 = time.monotonic()
        ckpt = self.save_checkpoint(step, seqs.state(), history, wait=True)
        log.info(
            "stop requested (%s): checkpoint of step %d committed in %.1f s",
            self.stop.signal_name,
            step,
            time.monotonic() - t0,
        )
        return ckpt

    def _should_stop(self, torch) -> tuple[bool, str | None]:
        """(stop now, the reason of a checkpoint requested now or None). Every rank must
        stop, or checkpoint, at the same step, or the checkpoint would mix steps (a request
        reaches rank 0's pod only); and every rank stops (without a checkpoint) once rank 0
        finds a newer attempt holding the checkpoint prefix."""
        flag, fenced, reason = bool(self.stop), self.ckpts.fenced, self.requested.take()
        if self.dist.world > 1:
            t = torch.tensor([float(flag), float(fenced), float(reason is not None)], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag, fenced = bool(t[0].item()), bool(t[1].item())
            if t[2].item() and reason is None:
                reason = "requested of rank 0"
        if fenced:
            raise Fenced(f"a newer attempt of this job writes {self.cfg.checkpoint.uri}; this attempt stops")
        return flag, reason

    def _from_rank0(self, value):
        if self.dist.world == 1:
            return value
        import torch

        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group (once training, export and checkpoints are done)."""
        import torch

        if self.dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _all_sum(self, torch, value):
        if self.dist.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return type(value)(t.item())

    def _evaluate(self, examples, pad_id, step) -> float:
        import torch

        from kubetune_trainer.sequences import Sequence

        self.model.eval()
        total, count = 0.0, 0
        bs = self.cfg.training.batch_size
        # (the operator must not take an evaluation pass, with no step done, for a stall)
        with self.progress.phase_while("evaluating"), torch.no_grad():
            for i in range(0, len(examples), bs):
                seqs = []
                for ex in examples[i : i + bs]:
                    s = Sequence()
                    s.add(ex)
                    seqs.append(s)
                batch = {k: v.to(self.device) for k, v in collate(seqs, pad_id, packing=False).items()}
                n = label_tokens(batch)
                loss = lm_loss(self.model, batch, n, self.sparse_logits)
                total, count = total + loss.item() * n, count + n
        self.model.train()
        loss = total / max(count, 1)
        self.progress.update(eval_loss=round(loss, 4))
        log.info(
            json.dumps(
                {"event": "eval", "step": step, "eval_loss": round(loss, 4), "examples": len(examples)}
            )
        )
        return loss

    def _trace(self, step: int, micro) -> None:
        if not self.trace_path:
            return
        ids = [sid for _, seqs in micro for s in seqs for sid in s.sample_ids]
        with open(self.trace_path, "a") as f:
            f.write(json.dumps({"step": step, "rank": self.dist.rank, "samples": ids}) + "\n")
