"""Base model + LoRA, per backend. Heavy imports stay inside functions so the config
and data code (and the operator, which shares the config) never need torch.

Backends:
  cuda-bnb  NVIDIA GPUs, bitsandbytes 4-bit
  xpu-bnb   Intel GPUs through stock PyTorch XPU, bitsandbytes 4-bit (>= 0.48)
  ipex-llm  the seed notebooks' Intel stack (bigdl-llm / ipex-llm + IPEX), own image
  cpu       bitsandbytes NF4 on CPU, float32 compute (bf16 is ~25x slower without AMX)"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from kubetune_trainer.storage import open_store

log = logging.getLogger("kubetune.model")

BACKENDS = ("cuda-bnb", "xpu-bnb", "ipex-llm", "cpu")
BACKEND_ENV = "KUBETUNE_BACKEND"


def pick_backend(environ=os.environ) -> str:
    chosen = environ.get(BACKEND_ENV, "auto")
    if chosen != "auto":
        if chosen not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={chosen!r}: expected auto or one of {', '.join(BACKENDS)}")
        return chosen
    import torch

    if torch.cuda.is_available():
        return "cuda-bnb"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu-bnb"
    return "cpu"


def device_for(backend: str, local_rank: int = 0) -> str:
    return {
        "cuda-bnb": f"cuda:{local_rank}",
        "xpu-bnb": f"xpu:{local_rank}",
        "ipex-llm": f"xpu:{local_rank}",
    }.get(backend, "cpu")


def compute_dtype_name(choice: str, backend: str, cuda_capability: tuple[int, int] | None = None) -> str:
    """auto: bfloat16 on Ampere+ and Intel GPUs, float16 on older NVIDIA GPUs, float32 on CPU."""
    if choice != "auto":
        return choice
    if backend == "cpu":
        return "float32"
    if backend == "cuda-bnb" and cuda_capability is not None and cuda_capability < (8, 0):
        return "float16"
    return "bfloat16"


def lora_targets(target_modules: list[str]):
    return "all-linear" if target_modules == ["all-linear"] else target_modules


def model_dir(model_cfg, cache: Path) -> str:
    """A local folder (or hub id) to load from; S3 folders are downloaded once into cache."""
    if model_cfg.name:
        return model_cfg.name
    uri = model_cfg.uri
    if uri.startswith("file://"):
        return uri[len("file://") :]
    dest = cache / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / ".complete").exists():
        return str(dest)
    store = open_store(uri)
    objects = store.list()
    if not objects:
        raise FileNotFoundError(f"no model files under {uri}")
    log.info("downloading the base model from %s (%d files)", uri, len(objects))
    for obj in objects:
        store.download(obj.key, dest / obj.key)
    (dest / ".complete").touch()
    return str(dest)


def load_tokenizer(path: str, model_cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg, backend: str, path: str, local_rank: int = 0):
    """The base model, quantized for qlora, with fresh LoRA adapters on top."""
    import torch

    device = device_for(backend, local_rank)
    capability = torch.cuda.get_device_capability(local_rank) if backend == "cuda-bnb" else None
    dtype = getattr(torch, compute_dtype_name(cfg.quantization.compute_dtype, backend, capability))
    common = {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}
    if backend == "ipex-llm":
        return _load_ipex_llm(cfg, path, dtype, device, common)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if cfg.method == "qlora":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization.type,
            bnb_4bit_use_double_quant=cfg.quantization.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if backend != "cpu" else torch.uint8,
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, dtype=dtype, device_map={"": device}, **common
        )
        # casts norms to fp32 for stability; gradient checkpointing only when asked for
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.training.gradient_checkpointing
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}, **common)
        if cfg.training.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_targets(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def shard_model(model) -> None:
    """FSDP2 (fully_shard): each decoder block is its own unit, then the rest of the
    model. For QLoRA the 4-bit weights are stored in the compute dtype
    (bnb_4bit_quant_storage, see load_model) so that they can be flattened and split."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    if not blocks:
        raise ValueError(f"{type(model.get_base_model()).__name__} names no decoder blocks to shard by")
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


def _load_ipex_llm(cfg, path, dtype, device, common):
    """The seed notebooks' stack, imported only in its own image."""
    try:
        from ipex_llm.transformers import AutoModelForCausalLM
        from ipex_llm.transformers.qlora import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError as e:  # pragma: no cover - only in the ipex-llm image
        raise RuntimeError(
            "backend ipex-llm needs the ipex-llm image (trainer_image/Dockerfile.ipex-llm)"
        ) from e
    model = AutoModelForCausalLM.from_pretrained(
        path, load_in_low_bit=cfg.quantization.type, optimize_model=False, torch_dtype=dtype, **common
    )
    model = model.to(device)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=cfg.training.gradient_checkpointing
    )
    model.config.use_cache = False
    targets = lora_targets(cfg.lora.target_modules)
    if targets == "all-linear":  # ipex-llm's peft predates all-linear
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        training_mode="qlora",
    )
    return get_peft_model(model, lora)
