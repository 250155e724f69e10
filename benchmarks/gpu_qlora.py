"""QLoRA on a CUDA GPU: a Llama-shaped ~1.1B model (random init, TinyLlama's shape),
NF4 + bf16 compute, LoRA r16 on all linear layers, text-to-SQL data; kubetune's trainer
(packing on) against TRL's SFTTrainer with the same settings (padding, no packing), in
one run: non-padding tokens/s and peak GPU memory. Skips cleanly without a CUDA GPU.

Last line: ratio=<kubetune tokens/s ÷ TRL tokens/s> (or ratio=skipped).

    python benchmarks/gpu_qlora.py [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in ("operator", "trainer_image", "devtools", "benchmarks", ""):
    sys.path.insert(0, str(ROOT / p))


def llama_1b(dest: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.helpers import tiny_sql_llama

    # the tokenizer: trained on the data, like the tiny model's
    tok = AutoTokenizer.from_pretrained(tiny_sql_llama(dest.parent / "tok", vocab_size=4096))
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: skipped")
        print("ratio=skipped")
        return
    from trainer_throughput import kubetune_run, trl_run

    name = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as d:
        model = llama_1b(Path(d) / "llama-1b")
        torch.cuda.reset_peak_memory_stats()
        trl = trl_run(model, args.steps, backend="cuda-bnb", seq=1024)
        trl_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ours = kubetune_run(model, args.steps, packing=True, every=10_000, backend="cuda-bnb", seq=1024)
        our_peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"GPU: {name}; {args.steps} steps, NF4 + bf16, LoRA r16 all-linear, ~1.1B Llama")
    print(
        f"TRL SFTTrainer (padding, no packing): {trl['tokens_per_s']:.0f} tokens/s, peak {trl_peak:.2f} GiB"
    )
    print(
        f"kubetune (packing):                   {ours['tokens_per_s']:.0f} tokens/s, peak {our_peak:.2f} GiB"
    )
    print(f"ratio={ours['tokens_per_s'] / trl['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
