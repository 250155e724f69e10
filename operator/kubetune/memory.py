"""GPU memory one training process of a FineTuneJob needs: what `minGpuMemoryMiB: auto`
asks the scheduler for, and what `kubetune render` prints. Pure; no hub access.

The model's shape comes from a small table of well-known architectures, matched by the
model's name (or the last folder of its URI). An unknown model gets no estimate (None),
never a guess. For a known one, per process, i.e. per GPU (with DDP, the default, each
GPU of a multi-GPU job holds a whole replica of the model; batchSize is per device):

  weights      qlora: every linear layer of the decoder blocks in 4 bits plus its
               quantization constants — one float32 absmax per 64 weights (0.5 bit per
               weight), or with doubleQuant an 8-bit absmax plus one float32 per 256
               blocks (8/64 + 32/(64*256) = 0.127 bit) [Dettmers et al. 2023, QLoRA,
               sec. 3; bitsandbytes blocksize 64]; everything else (embeddings, output
               head, norms) in float32, because peft's prepare_model_for_kbit_training
               upcasts every parameter that is not 4-bit.
               lora: every parameter in the compute dtype (2 bytes; 4 for float32).
  adapter      LoRA parameters r * (in + out) per adapted module, kept in float32 by
               peft: weights 4 + gradients 4 + AdamW states 8 bytes (2 for the 8-bit
               optimizers) per parameter; with several ranks DDP adds its gradient
               buckets (4 bytes), while training.strategy fsdp divides weights and
               adapter by the number of ranks and adds two gathered decoder blocks.
  activations  per token (batch * maxSeqLength tokens) and decoder block, the tensors
               autograd keeps for the backward pass, in the compute dtype: norm and
               projection inputs, q/k/v and their rotary copies, the attention output
               (5h + 3kv; fused attention keeps no s*s score matrix), and the MLP's
               2h + 4i (gated: gate, up, activation, product) or 2h + 2i (plain) — the
               count of Korthikanti et al. 2022 ("Reducing Activation Recomputation in
               Large Transformer Models", 34sbh per layer for GPT) for these layer
               shapes, without dropout. In qlora the upcast norms output float32 (2h
               more bytes each). peft casts an adapter's input to the adapter's float32:
               a copy (4 bytes * in) unless the input already is float32 (a qlora norm's
               output); LoRA dropout adds its mask and float32 output (5 bytes * in). With
               gradient checkpointing only each block's input (2h) is kept, plus one
               block's full set while it is recomputed.
  logits       tokens * vocabulary * 12 bytes (float32 logits, the loss's log-softmax
               and the logits' gradient), as if every position were a label: an upper
               bound, the trainer computes logits only where a label follows.
  overhead     the CUDA context and library workspaces (600 MiB), the largest weight
               dequantized for a matmul, and 10% of the dynamic part for the caching
               allocator's fragmentation.

Checked against published figures in tests/unit/test_memory.py: Falcon-7B QLoRA under
15 GB (the seed trained on a T4), Llama-2-7B QLoRA on a 16 GB T4, and the QLoRA paper's
65B on one 48 GB GPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubetune.api import FineTuneJobSpec

MIB = 1 << 20
NF4_BITS = 4.0
ABSMAX_BITS = 32 / 64  # one float32 absmax per block of 64 weights
DOUBLE_QUANT_BITS = 8 / 64 + 32 / (64 * 256)  # 8-bit absmax, one float32 per 256 blocks
CUDA_CONTEXT_MIB = 600
FRAGMENTATION = 0.10
LOGIT_BYTES = 12
OPTIMIZER_STATE_BYTES = {"adamw": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only transformer, as far as memory goes."""

    name: str
    family: str  # llama | falcon | phi: module names and layout
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv: int  # width of the key and value projections (kv heads * head dim)
    tied_embeddings: bool = False

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    def norm_fed(self) -> set[str]:
        """The modules whose input is a norm's output (float32 in QLoRA, see below)."""
        return {
            "llama": {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"},
            "falcon": {"query_key_value", "dense_h_to_4h"},
            "phi": {"q_proj", "k_proj", "v_proj", "fc1"},
        }[self.family]

    def modules(self) -> dict[str, tuple[int, int]]:
        """Linear modules of one decoder block: name -> (in, out) features."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        if self.family == "falcon":
            return {
                "query_key_value": (h, h + 2 * kv),
                "dense": (h, h),
                "dense_h_to_4h": (h, i),
                "dense_4h_to_h": (i, h),
            }
        attention = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv)}
        if self.family == "phi":
            return {**attention, "dense": (h, h), "fc1": (h, i), "fc2": (i, h)}
        return {**attention, "o_proj": (h, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_parameters(self) -> int:
        return self.layers * sum(a * b for a, b in self.modules().values())

    def other_parameters(self) -> int:
        """Embeddings, output head and norms: never quantized."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden

    def parameters(self) -> int:
        return self.linear_parameters() + self.other_parameters()


def _llama(name, hidden, layers, intermediate, kv=None, vocab=32000, tied=False) -> Arch:
    return Arch(name, "llama", hidden, layers, intermediate, vocab, kv or hidden, tied)


LLAMA_7B = _llama("LLaMA-7B", 4096, 32, 11008)
LLAMA_13B = _llama("LLaMA-13B", 5120, 40, 13824)
LLAMA_33B = _llama("LLaMA-33B", 6656, 60, 17920)
LLAMA_65B = _llama("LLaMA-65B", 8192, 80, 22016)
LLAMA2_7B = _llama("Llama-2-7B", 4096, 32, 11008)
LLAMA2_13B = _llama("Llama-2-13B", 5120, 40, 13824)
LLAMA2_70B = _llama("Llama-2-70B", 8192, 80, 28672, kv=1024)
CODELLAMA_7B = _llama("CodeLlama-7B", 4096, 32, 11008, vocab=32016)
CODELLAMA_13B = _llama("CodeLlama-13B", 5120, 40, 13824, vocab=32016)
LLAMA3_8B = _llama("Llama-3-8B", 4096, 32, 14336, kv=1024, vocab=128256)
LLAMA3_70B = _llama("Llama-3-70B", 8192, 80, 28672, kv=1024, vocab=128256)
MISTRAL_7B = _llama("Mistral-7B", 4096, 32, 14336, kv=1024)
TINYLLAMA = _llama("TinyLlama-1.1B", 2048, 22, 5632, kv=256)
SMOLLM2_135M = _llama("SmolLM2-135M", 576, 30, 1536, kv=192, vocab=49152, tied=True)
SMOLLM2_1_7B = _llama("SmolLM2-1.7B", 2048, 24, 8192, vocab=49152, tied=True)
FALCON_7B = Arch("Falcon-7B", "falcon", 4544, 32, 18176, 65024, kv=64, tied_embeddings=True)
PHI_2 = Arch("Phi-2", "phi", 2560, 32, 10240, 51200, kv=2560)
PHI_1_5 = Arch("Phi-1.5", "phi", 2048, 24, 8192, 51200, kv=2048)

_N = r"(?![0-9.])"  # the size ends there: 7b is not 70b
KNOWN: tuple[tuple[str, Arch], ...] = (
    (rf"codellama-7b{_N}", CODELLAMA_7B),
    (rf"codellama-13b{_N}", CODELLAMA_13B),
    (rf"llama-?3(\.[0-9])?-8b{_N}", LLAMA3_8B),
    (rf"llama-?3(\.[0-9])?-70b{_N}", LLAMA3_70B),
    (rf"llama-?2-7b{_N}", LLAMA2_7B),
    (rf"llama-?2-13b{_N}", LLAMA2_13B),
    (rf"llama-?2-70b{_N}", LLAMA2_70B),
    (rf"(^|[^a-z0-9])llama-7b{_N}", LLAMA_7B),
    (rf"(^|[^a-z0-9])llama-13b{_N}", LLAMA_13B),
    (rf"(^|[^a-z0-9])llama-(30|33)b{_N}", LLAMA_33B),
    (rf"(^|[^a-z0-9])llama-65b{_N}", LLAMA_65B),
    (rf"mistral-7b{_N}", MISTRAL_7B),
    (rf"tinyllama-1\.1b{_N}", TINYLLAMA),
    (rf"smollm2?-135m{_N}", SMOLLM2_135M),
    (rf"smollm2-1\.7b{_N}", SMOLLM2_1_7B),
    (rf"falcon-7b{_N}", FALCON_7B),
    (r"(^|[^a-z0-9])phi-2(?![0-9])", PHI_2),
    (r"(^|[^a-z0-9])phi-1[._]5(?![0-9])", PHI_1_5),
)


def model_key(name: str | None, uri: str | None) -> str:
    """What the table is matched against: the Hub id, or the URI's last folder."""
    text = name if name else (uri or "").rstrip("/").rsplit("/", 1)[-1]
    return text.lower().replace("_", "-")


def lookup(name: str | None, uri: str | None = None) -> Arch | None:
    key = model_key(name, uri)
    return next((arch for pattern, arch in KNOWN if re.search(pattern, key)), None)


@dataclass(frozen=True)
class Estimate:
    """GPU memory of one training process, by part, in MiB."""

    model: str
    parameters: int
    lora_parameters: int
    weights_mib: float
    adapter_mib: float
    activations_mib: float
    logits_mib: float
    overhead_mib: float

    @property
    def total_mib(self) -> int:
        return math.ceil(
            self.weights_mib + self.adapter_mib + self.activations_mib + self.logits_mib + self.overhead_mib
        )

    def summary(self) -> str:
        return (
            f"{_gib(self.total_mib)} GiB ({self.total_mib} MiB) per GPU for {self.model} "
            f"({self.parameters / 1e9:.2f}B parameters, {self.lora_parameters / 1e6:.1f}M LoRA): "
            f"weights {_gib(self.weights_mib)}, adapter and optimizer {_gib(self.adapter_mib)}, "
            f"activations {_gib(self.activations_mib)}, logits {_gib(self.logits_mib)}, "
            f"overhead {_gib(self.overhead_mib)} GiB"
        )


def _gib(mib: float) -> str:
    return f"{mib / 1024:.1f}"


def adapted(arch: Arch, target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """The modules of a block that LoRA adapts (peft matches a target by its last name)."""
    modules = arch.modules()
    if "all-linear" in target_modules:
        return modules
    names = {t.rsplit(".", 1)[-1] for t in target_modules}
    return {n: shape for n, shape in modules.items() if n in names}


def estimate(spec: FineTuneJobSpec) -> Estimate | None:
    """GPU memory one process of this job needs, or None for a model not in the table."""
    arch = lookup(spec.model.name, spec.model.uri)
    if arch is None:
        return None
    qlora = spec.method == "qlora"
    dtype_bytes = 4 if spec.quantization.compute_dtype == "float32" else 2
    t = spec.training

    if qlora:
        bits = NF4_BITS + (DOUBLE_QUANT_BITS if spec.quantization.double_quant else ABSMAX_BITS)
        block_weights = arch.linear_parameters() / arch.layers * bits / 8
        weights = block_weights * arch.layers + arch.other_parameters() * 4
    else:
        block_weights = arch.linear_parameters() / arch.layers * dtype_bytes
        weights = arch.parameters() * dtype_bytes

    targets = adapted(arch, spec.lora.target_modules)
    lora_params = arch.layers * sum(spec.lora.r * (a + b) for a, b in targets.values())
    adapter = lora_params * (4 + 4 + OPTIMIZER_STATE_BYTES[t.optimizer])
    ranks = spec.workers * max(spec.resources.gpus, 1)
    if ranks > 1 and t.strategy == "fsdp":
        # a shard of everything, plus the block being computed and the one prefetched
        weights = weights / ranks + 2 * block_weights
        adapter /= ranks
    elif ranks > 1:
        adapter += lora_params * 4  # DDP's gradient buckets

    h, i, kv = arch.hidden, arch.intermediate, arch.kv
    block = dtype_bytes * (5 * h + 3 * kv + 2 * h + (4 if arch.gated_mlp else 2) * i)
    fp32_norms = qlora and dtype_bytes < 4  # their weights were upcast: float32 outputs
    if fp32_norms:
        block += 2 * (4 - dtype_bytes) * h
    for name, (a, _) in targets.items():
        if dtype_bytes < 4 and not (fp32_norms and name in arch.norm_fed()):
            block += 4 * a  # peft's float32 copy of the input
        if spec.lora.dropout > 0:
            block += 5 * a  # dropout's mask and float32 output
    tokens = t.batch_size * spec.dataset.max_seq_length
    if t.gradient_checkpointing:
        activations = tokens * (arch.layers * dtype_bytes * h + block)
    else:
        activations = tokens * arch.layers * block
    logits = tokens * arch.vocab * LOGIT_BYTES

    dequantized = max(a * b for a, b in arch.modules().values()) * dtype_bytes if qlora else 0
    overhead = CUDA_CONTEXT_MIB * MIB + dequantized + FRAGMENTATION * (activations + logits + dequantized)
    return Estimate(
        model=arch.name,
        parameters=arch.parameters(),
        lora_parameters=lora_params,
        weights_mib=weights / MIB,
        adapter_mib=adapter / MIB,
        activations_mib=activations / MIB,
        logits_mib=logits / MIB,
        overhead_mib=overhead / MIB,
    )
