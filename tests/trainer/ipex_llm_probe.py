"""Run inside the ipex-llm venv (hack/ensure-env.sh --stack ipex-llm) by test_ipex_llm.py:
the trained adapter on the base exactly as training loaded it (ipex-llm's low-bit layers,
through the trainer's own load_model), and that base's low-bit weights dequantized into a
plain transformers folder, so that the stock stack can be checked against training.

    python ipex_llm_probe.py CONFIG.json ADAPTER_DIR TOKEN_IDS.json OUT_DIR

writes OUT_DIR/logits.safetensors (training-time logits of TOKEN_IDS, and the eval-mode
ones) and OUT_DIR/base/
(config and tokenizer of the model, its weights with every low-bit layer dequantized)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path


def main(config_path: str, adapter_dir: str, ids_path: str, out_dir: str) -> None:
    import torch
    from ipex_llm.transformers.low_bit_linear import LowBitLinear, ggml_convert_fp32
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from kubetune_trainer.config import TrainingConfig
    from kubetune_trainer.model import load_model

    cfg = TrainingConfig.model_validate(json.loads(Path(config_path).read_text()))
    model_path = cfg.model.uri.removeprefix("file://")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    model = load_model(cfg, "ipex-llm", model_path, dtype=torch.float32)
    adapter = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, adapter)
    assert not result.unexpected_keys, result.unexpected_keys
    ids = torch.tensor(json.loads(Path(ids_path).read_text()))
    # As training computes: a low-bit layer in train mode with an input that needs grad
    # dequantizes its weights and multiplies in float32 (MatMulLowBitCPU); without grad
    # (eval, generation) it runs ggml's int4 x int8 kernel instead, which quantizes the
    # input too. Dropout off, so that the pass is deterministic.
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    logits = model(input_ids=ids).logits.float().detach()
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits.float()
    save_file(
        {"logits": logits.contiguous(), "eval_logits": eval_logits.contiguous()},
        str(out / "logits.safetensors"),
    )

    # the base's weights as training computed with them: every low-bit layer dequantized
    weights = load_file(str(Path(model_path) / "model.safetensors"))
    dequantized = 0
    for name, module in model.get_base_model().named_modules():
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, LowBitLinear) and name.endswith(("_proj",)):
            w = layer.weight
            shape = tuple(w._shape)
            weights[f"{name}.weight"] = ggml_convert_fp32(w.data, shape, math.prod(shape), w.qtype)
            dequantized += 1
    assert dequantized, "no low-bit layer found"
    base = out / "base"
    shutil.copytree(model_path, base, dirs_exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(base / "model.safetensors"))
    print(json.dumps({"dequantized_layers": dequantized}))


if __name__ == "__main__":
    main(*sys.argv[1:])
