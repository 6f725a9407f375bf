"""Random-weight Llama checkpoints of any shape (e.g. 7B-shaped layers) for speed benchmarks
and tests: config.json + model.safetensors, written under a temporary name and renamed into
place. Random weights say nothing about quality; the benchmarks report quality on the
shipped, trained decoder-lm instead."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

SEVEN_B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=8)


def llama_config(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int,
                 vocab: int, dtype=torch.float16) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden, "intermediate_size": intermediate,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "num_hidden_layers": layers, "vocab_size": vocab, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "torch_dtype": str(dtype).replace("torch.", "")}


def write_llama(out, hidden: int = 64, intermediate: int = 128, heads: int = 4, kv_heads: int = 2,
                layers: int = 2, vocab: int = 4096, dtype=torch.float16, seed: int = 0,
                tokenizer_from=None, device="cpu") -> Path:
    """A Llama checkpoint with N(0, 1/sqrt(fan_in)) weights (activations keep unit scale
    through the layers). tokenizer_from: a directory whose tokenizer files are copied
    (compress_checkpoint tokenizes its calibration text). Returns `out`."""
    from safetensors.torch import save_file

    from lathe.io import atomic_dir

    out = Path(out)
    cfg = llama_config(hidden, intermediate, heads, kv_heads, layers, vocab, dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    D = hidden // heads

    def w(n, k):
        return (torch.randn(n, k, generator=g, device=device) / k ** 0.5).to(dtype).cpu()

    sd = {"model.embed_tokens.weight": w(vocab, hidden) * 1.0,
          "model.norm.weight": torch.ones(hidden, dtype=dtype), "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": w(heads * D, hidden),
                   p + "self_attn.k_proj.weight": w(kv_heads * D, hidden),
                   p + "self_attn.v_proj.weight": w(kv_heads * D, hidden),
                   p + "self_attn.o_proj.weight": w(hidden, heads * D),
                   p + "mlp.gate_proj.weight": w(intermediate, hidden),
                   p + "mlp.up_proj.weight": w(intermediate, hidden),
                   p + "mlp.down_proj.weight": w(hidden, intermediate),
                   p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
                   p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype)})
    with atomic_dir(out) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer_from is not None:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(tokenizer_from) / name).is_file():
                    shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    return out


def quantize_checkpoint(src, recipe: str, out, device="cpu") -> Path:
    """Compress `src` with a calibration-free preset (int4-rtn, int8-dynamic,
    int8-weight-only, fp8) on `device` and save a lathe compressed checkpoint: the same
    modules and manifest compress_checkpoint writes, without its CPU quality report (too slow
    for 7B-shaped layers in a benchmark)."""
    from lathe.compress.checkpoint import build_model, save
    from lathe.compress.quantize import quantize
    from lathe.compress.recipes import load_recipe
    from lathe.source import open_source

    rec = load_recipe(recipe)
    source = open_source(src)
    model = build_model(source, device)
    with torch.device(device):  # the quantized modules are made there too (no CPU packing)
        for step in rec.steps:
            quantize(model, step)
    return save(model, source, out, rec.to_dict())
