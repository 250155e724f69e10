"""Base model + LoRA, per backend. Heavy imports stay inside functions so the config
and data code (and the operator, which shares the config) never need torch.

Backends:
  cuda-bnb  NVIDIA GPUs, bitsandbytes 4-bit
  xpu-bnb   Intel GPUs through stock PyTorch XPU, bitsandbytes 4-bit (>= 0.48)
  ipex-llm  the seed notebooks' Intel stack (bigdl-llm / ipex-llm + IPEX), own venv and
            image; on an Intel GPU where one is present, else on CPU (ipex-llm's CPU kernels)
  cpu       bitsandbytes NF4 on CPU; float32 compute, or bfloat16 where the CPU has native
            bf16 matmuls (AMX / AVX-512 BF16) and a probe shows them faster (without
            them bf16 is ~25x slower)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from kubetune_trainer.storage import inside, open_store

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


def device_for(backend: str, local_rank: int = 0, xpu_available: bool = True) -> str:
    """ipex-llm: the Intel GPU, or the CPU where there is none (its low-bit kernels have
    CPU versions); the bitsandbytes backends are picked by their device."""
    if backend == "ipex-llm":
        return f"xpu:{local_rank}" if xpu_available else "cpu"
    return {"cuda-bnb": f"cuda:{local_rank}", "xpu-bnb": f"xpu:{local_rank}"}.get(backend, "cpu")


def xpu_available() -> bool:
    import torch

    return hasattr(torch, "xpu") and torch.xpu.is_available()


def on_cpu(backend: str) -> bool:
    """Whether this backend computes on the CPU here."""
    if backend == "cpu":
        return True
    return backend == "ipex-llm" and not xpu_available()


# ipex-llm 2.2 has NF4 and FP4 kernels only for Intel GPUs: on CPU its loader refuses them
# ("NF3, NF4, FP4 and FP8 quantization are currently not supported on CPU"). Its CPU 4-bit
# format is sym_int4: 4 bits a weight with a scale per block of 32, as NF4 has per block of
# 64, but evenly spaced levels instead of NormalFloat's. (asym_int4 and sym_int8 train to
# NaN losses with its QLoRA layers on CPU; measured on the tiny Llama.)
IPEX_LLM_CPU_LOW_BIT = "sym_int4"


def ipex_llm_low_bit(quant_type: str, on_xpu: bool) -> str:
    """ipex-llm's load_in_low_bit for quantization.type on this device."""
    return quant_type if on_xpu else IPEX_LLM_CPU_LOW_BIT


def compute_dtype_name(
    choice: str,
    backend: str,
    cuda_capability: tuple[int, int] | None = None,
    cpu_bf16_faster: bool = False,
) -> str:
    """auto: bfloat16 on Ampere+ and Intel GPUs, float16 on older NVIDIA GPUs; on CPU
    bfloat16 only where it was measured faster (cpu_bf16_faster), float32 elsewhere."""
    if choice != "auto":
        return choice
    if backend == "cpu":
        return "bfloat16" if cpu_bf16_faster else "float32"
    if backend == "cuda-bnb" and cuda_capability is not None and cuda_capability < (8, 0):
        return "float16"
    return "bfloat16"


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# bf16 must win by this much to be chosen: a resumed run re-probes, and a margin this
# wide keeps its choice the same as the first attempt's on a busy machine (AMX: ~3.5x)
CPU_BF16_MIN_SPEEDUP = 1.5


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Native bf16 matmul instructions in /proc/cpuinfo's flags (x86: AMX or AVX-512 BF16)."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return any(f in flags for f in CPU_BF16_FLAGS)


def probe_cpu_bf16_speedup(rounds: int = 3) -> float:
    """fp32 time ÷ bf16 time of a transformer-sized matmul (576 x 1536, 1024 tokens),
    best of `rounds` interleaved runs each, about 0.1 s in all."""
    import torch

    a32, b32 = torch.randn(1024, 576), torch.randn(576, 1536)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for _ in range(rounds):
        for dt, (a, b) in ((torch.float32, (a32, b32)), (torch.bfloat16, (a16, b16))):
            torch.matmul(a, b)  # warm the kernel
            t0 = time.perf_counter()
            for _ in range(5):
                torch.matmul(a, b)
            best[dt] = min(best[dt], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def cpu_bf16_faster(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    try:
        cpuinfo = Path(cpuinfo_path).read_text()
    except OSError:
        return False
    if not cpu_has_bf16(cpuinfo):
        return False
    speedup = probe_cpu_bf16_speedup()
    log.info("CPU has native bf16: bf16 matmul %.2fx the speed of fp32", speedup)
    return speedup >= CPU_BF16_MIN_SPEEDUP


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
        store.download(obj.key, inside(dest, obj.key))
    (dest / ".complete").touch()
    return str(dest)


def transformers4_config_overrides(config: dict) -> dict:
    """A model folder saved by transformers 5 keeps rope_theta (and any rope scaling) in
    rope_parameters, which transformers 4 (the ipex-llm stack's) does not read: it would
    run its default theta (10,000; SmolLM2's is 100,000) without a word. The keyword
    arguments that give them back to a transformers 4 config; {} for a v4 folder."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return {}
    out = {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _local_json(path: str, name: str) -> dict:
    try:
        return json.loads((Path(path) / name).read_text())
    except (OSError, ValueError):
        return {}


def load_tokenizer(path: str, model_cfg):
    from transformers import AutoTokenizer

    kwargs = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    if (
        transformers_major() < 5
        and _local_json(path, "tokenizer_config.json").get("tokenizer_class") == "TokenizersBackend"
    ):
        # transformers 5's name for a tokenizer.json tokenizer; transformers 4 calls it so
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    else:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_compute_dtype(cfg, backend: str, local_rank: int = 0, agree=None, resumed: str | None = None):
    """The torch dtype of computeDtype on this device. `agree(bool) -> bool` makes the
    ranks of a distributed run take the same CPU choice (bf16 only if every rank chose it);
    `resumed`: the dtype the checkpoint being resumed was trained in, which auto keeps."""
    import torch

    choice = cfg.quantization.compute_dtype
    if backend == "ipex-llm" and not xpu_available():
        # ipex-llm's QLoRA layers on CPU train in float32 only (a bfloat16 base fails in
        # its low-bit matmul), so auto means float32 here whatever the CPU has
        if choice not in ("auto", "float32"):
            raise ValueError(
                f"quantization.computeDtype {choice}: backend ipex-llm on CPU computes in float32 "
                "only; use auto or float32 (or an Intel GPU)"
            )
        return torch.float32
    if choice == "auto" and resumed in ("float32", "bfloat16", "float16"):
        return getattr(torch, resumed)
    capability = torch.cuda.get_device_capability(local_rank) if backend == "cuda-bnb" else None
    bf16 = False
    if choice == "auto" and backend == "cpu":
        bf16 = cpu_bf16_faster()
        if agree is not None:
            bf16 = agree(bf16)
    return getattr(torch, compute_dtype_name(choice, backend, capability, bf16))


def quantization_config(cfg, dtype, backend: str):
    """The 4-bit BitsAndBytesConfig of method qlora (also what a merged export dequantizes)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization.type,
        bnb_4bit_use_double_quant=cfg.quantization.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype if backend != "cpu" else torch.uint8,
    )


def keep_4bit_layers_differentiable(model) -> int:
    """bitsandbytes (0.49+) on CPUs with AVX512-BF16 repacks a 4-bit layer's weights the
    first time it runs in eval mode without gradients (generation, evaluation), for a
    bf16 inference kernel, and from then on runs that kernel in train mode too: it has no
    backward, so after the first evaluation the gradient stops at every frozen 4-bit
    layer, and the layer computes in bf16 whatever the compute dtype. Training quality
    then depended on the CPU (and a resumed run, which skips the first evaluation,
    trained differently from an uninterrupted one). Off: every pass computes the same way.
    Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


@contextlib.contextmanager
def dense_4bit_layers(model):
    """Decoding on CPU: bitsandbytes dequantizes every 4-bit weight on every forward pass
    (its fast AVX512-BF16 kernel stays off, see keep_4bit_layers_differentiable), and a
    decoding loop makes one pass per token. For the duration, each 4-bit layer is replaced
    by its weights dequantized once, computed the same way (input cast to the compute
    dtype, output cast back): the same results, several times faster."""
    import bitsandbytes as bnb
    import torch

    class DequantizedLinear(torch.nn.Module):
        def __init__(self, layer) -> None:
            super().__init__()
            dtype = layer.compute_dtype or torch.float32
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            self.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
            self.bias = layer.bias

        def forward(self, x):
            bias = None if self.bias is None else self.bias.to(self.weight.dtype)
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)

    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                setattr(parent, name, DequantizedLinear(child))
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def load_model(cfg, backend: str, path: str, local_rank: int = 0, dtype=None):
    """The base model, quantized for qlora, with fresh LoRA adapters on top."""

    has_xpu = xpu_available() if backend == "ipex-llm" else True
    if not has_xpu and os.environ.get("KUBETUNE_REQUIRE_XPU") == "1":
        # an Intel GPU pod (the operator sets it): never train on its CPU instead
        raise RuntimeError("backend ipex-llm: this pod was given Intel GPUs but torch sees no XPU")
    device = device_for(backend, local_rank, has_xpu)
    if dtype is None:
        dtype = resolve_compute_dtype(cfg, backend, local_rank)
    common = {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}
    if backend == "ipex-llm":
        return _load_ipex_llm(cfg, path, dtype, device, common)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    if cfg.method == "qlora":
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization_config(cfg, dtype, backend),
            dtype=dtype,
            device_map={"": device},
            **common,
        )
        keep_4bit_layers_differentiable(model)
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
    """The seed notebooks' stack (its own venv and image: requirements/ipex-llm.lock).

    As the seed did, intel_extension_for_pytorch is imported first (on an Intel GPU it
    registers the device and its kernels). The seed trained through HF's Trainer, whose
    ipex.optimize call ipex-llm replaces with a no-op (ipex_llm.transformers.training_patch,
    patch_prepare_ipex), so the seed's training never ran ipex.optimize, and neither does
    this: the low-bit layers and their kernels are ipex-llm's own."""
    if cfg.method != "qlora":
        raise ValueError("backend ipex-llm trains method qlora only (its low-bit base)")
    if cfg.output.merged_model:
        raise ValueError("output.mergedModel: backend ipex-llm exports the adapter only")
    try:
        import intel_extension_for_pytorch  # noqa: F401  (see above)
        from ipex_llm.transformers import AutoModelForCausalLM
        from ipex_llm.transformers.qlora import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError as e:
        raise RuntimeError(
            f"backend ipex-llm cannot import its stack ({type(e).__name__}: {e}): it runs in the "
            "ipex-llm image (trainer_image/Dockerfile.ipex-llm) or venv (hack/ensure-env.sh --stack ipex-llm)"
        ) from e
    low_bit = ipex_llm_low_bit(cfg.quantization.type, device.startswith("xpu"))
    if low_bit != cfg.quantization.type:
        log.warning(
            "ipex-llm has no %s kernels on CPU: the base is quantized to %s (4-bit integer) instead",
            cfg.quantization.type,
            low_bit,
        )
    if transformers_major() < 5:
        common = {**common, **transformers4_config_overrides(_local_json(path, "config.json"))}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        load_in_low_bit=low_bit,
        optimize_model=False,  # ipex-llm's inference rewrites of the attention: not for training
        torch_dtype=dtype,
        modules_to_not_convert=["lm_head"],  # as the seed: the output layer stays unquantized
        **common,
    )
    model = model.to(device)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=cfg.training.gradient_checkpointing
    )
    # On CPU an ipex-llm low-bit layer dequantizes its weights and multiplies in float32
    # only when its input needs grad; otherwise it runs ggml's int4 x int8 kernel, which
    # rounds the input to 8 bits. Without this the first block's projections (whose
    # inputs come from the frozen embeddings) trained on rounded inputs, and no stock
    # stack could reproduce the training-time outputs (measured: logits off by 2e-3).
    model.enable_input_require_grads()
    model.config.use_cache = False
    targets = lora_targets(cfg.lora.target_modules)
    if targets == "all-linear":  # ipex-llm's QLoRA layers replace named modules only
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
