"""Serving a lathe checkpoint elsewhere: the compressed-tensors layout that vLLM reads.

lathe's own checkpoint keeps lathe's tensor layout (and may fuse q/k/v), so a
`quantization_config` alone in its config.json would describe tensors vLLM cannot find.
export_compressed_tensors() therefore writes a separate directory, atomically:

  config.json        the source config plus `quantization_config` (quant_method
                     "compressed-tensors", config_groups, ignore, format)
  model.safetensors  per quantized Linear (Hugging Face module names, q/k/v split back):
                     int8 W8A8 ("int-quantized"): weight int8 [N, K], weight_scale [N, 1];
                     int4 W4A16 ("pack-quantized"): weight_packed int32 [N, K/8] (8 codes a word,
                     element j in bits 4j..4j+3: lathe's nibble order read as little-endian
                     int32), weight_scale [N, K/g], weight_shape [2], and when asymmetric
                     weight_zero_point int32 [ceil(N/8), K/g] (packed along N);
                     every other tensor unchanged.
  tokenizer files    copied.

compressed-tensors stores signed codes (q - 8 for 4 bits): lathe's unsigned code c and zero
point z become c - 8 and z - 8, so (q - zp) * scale is lathe's (c - z) * scale exactly.

Not expressible, so refused (BadInput): lathe's explicit per-input-channel multipliers
(SmoothQuant in `int8`, AWQ in `int4-awq`: compressed-tensors has no such tensor; vLLM's
flows fold them into the preceding norm, which is inexact where the input is a GELU/SiLU
output), FP8 and int8 weight-only modules. Use int8-dynamic, int4-rtn or int4-gptq.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from lathe.errors import BadInput

INT8_FORMAT, INT4_FORMAT = "int-quantized", "pack-quantized"


# ----------------------------------------------------------------------------- packing


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [R, C] -> int32 [R, ceil(C/8)], element j in bits 4j..4j+3."""
    R, C = codes.shape
    pad = (-C) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(R, -1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * 4
    words = (c << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4_rows(packed: torch.Tensor, C: int) -> torch.Tensor:
    """The inverse of pack_int4_rows: uint8 codes [R, C]."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.int64) * 4
    codes = (w[..., None] >> shifts) & 0xF
    return codes.reshape(packed.shape[0], -1)[:, :C].to(torch.uint8)


def qweight_to_packed(qweight: torch.Tensor) -> torch.Tensor:
    """lathe's uint8 [N, K/2] (low nibble = even k) is already this packing, read as int32."""
    if qweight.shape[1] % 4:
        raise BadInput(f"in_features {qweight.shape[1] * 2} is not a multiple of 8: cannot pack int4 into int32")
    return qweight.contiguous().view(torch.int32)


# ----------------------------------------------------------------------------- schemes


def _args(num_bits, symmetric, strategy, group_size=None, dynamic=False) -> dict:
    return {"num_bits": num_bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size, "dynamic": dynamic}


def _w8a8_scheme(m) -> tuple[str, dict]:
    return INT8_FORMAT, {"weights": _args(8, True, "channel"),
                         "input_activations": _args(8, not m.act_asym, "token", dynamic=True)}


def _w8a8_tensors(m) -> dict:
    return {"weight": m.weight, "weight_scale": m.weight_scale.float().reshape(-1, 1)}


def _w4a16_scheme(m) -> tuple[str, dict]:
    return INT4_FORMAT, {"weights": _args(4, m.symmetric, "group", m.group_size), "input_activations": None}


def _w4a16_tensors(m) -> dict:
    out = {"weight_packed": qweight_to_packed(m.qweight), "weight_scale": m.scales.float(),
           "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64)}
    if not m.symmetric:
        out["weight_zero_point"] = m.zeros  # packed after the row split, along N
    return out


# lathe format name -> (scheme, tensors) of its compressed-tensors export
SCHEMES = {"int8_per_channel_sym": (_w8a8_scheme, _w8a8_tensors),
           "int4_group": (_w4a16_scheme, _w4a16_tensors)}


def _scheme(m):
    from lathe.compress.formats import format_of

    fmt = format_of(m)
    entry = SCHEMES.get(fmt.name) if fmt is not None else None
    if entry is None:
        raise BadInput(f"{type(m).__name__} has no compressed-tensors export yet (int8 W8A8 and int4 W4A16 do)")
    return entry


def scheme_of(m) -> tuple[str, dict]:
    """(format, {weights, input_activations}) of a lathe quantized module, or BadInput."""
    smooth = getattr(m, "smooth", None)
    if smooth is not None and not torch.all(smooth == 1):
        raise BadInput(f"{type(m).__name__} carries a per-channel input multiplier (SmoothQuant/AWQ) "
                       "that compressed-tensors cannot express; compress with int8-dynamic, int4-rtn "
                       "or int4-gptq for vLLM")
    return _scheme(m)[0](m)


# ----------------------------------------------------------------------------- tensors


def _split_sizes(model, parent: str, leaf: str):
    """Fused q/k/v modules and the Hugging Face names and row counts they came from."""
    c = model.config
    hd = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    q = c["num_attention_heads"] * hd
    if leaf == "qkv":  # BERT-style SelfAttention
        return [(f"{parent}.{n}", q) for n in ("query", "key", "value")]
    if leaf == "qkv_proj":  # Llama-style attention
        kv = c.get("num_key_value_heads", c["num_attention_heads"]) * hd
        return [(f"{parent}.q_proj", q), (f"{parent}.k_proj", kv), (f"{parent}.v_proj", kv)]
    return None


def _module_tensors(m) -> dict:
    """compressed-tensors names -> tensors for one module (full rows)."""
    out = _scheme(m)[1](m)
    if m.bias is not None:
        out["bias"] = m.bias.float()
    return out


def _rows(t: dict, start: int, n: int, K: int) -> dict:
    out = {}
    for k, v in t.items():
        out[k] = torch.tensor([n, K], dtype=torch.int64) if k == "weight_shape" else v[start:start + n]
    return out


def compressed_tensors_state(model: nn.Module) -> tuple[dict, dict, list]:
    """(state dict in compressed-tensors layout, {format: [module names]}, ignore list)."""
    from lathe.compress.modules import QUANT_MODULES

    sd, groups, ignore, owned = {}, {}, [], set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            ignore.append(name)
        if type(m).__name__ not in QUANT_MODULES:
            continue
        fmt, _ = scheme_of(m)
        parent, _, leaf = name.rpartition(".")
        t = _module_tensors(m)
        owned.update(f"{name}.{k}" for k, _ in m.named_buffers())
        parts = _split_sizes(model, parent, leaf) or [(name, m.out_features)]
        start = 0
        for hf_name, n in parts:
            rows = _rows(t, start, n, m.in_features)
            start += n
            if "weight_zero_point" in rows:
                rows["weight_zero_point"] = pack_int4_rows(rows["weight_zero_point"].t().contiguous()).t().contiguous()
            sd.update({f"{hf_name}.{k}": v.contiguous() for k, v in rows.items()})
            groups.setdefault(fmt, []).append(hf_name)
    for k, v in model.state_dict().items():
        if k not in owned:
            sd[k] = v.contiguous()
    return sd, groups, ignore


def quantization_config(model: nn.Module) -> dict:
    """The `quantization_config` entry for config.json (compressed-tensors, as vLLM reads it)."""
    from lathe.compress.modules import QUANT_MODULES

    schemes, ignore = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            ignore.append(name)
        elif type(m).__name__ in QUANT_MODULES:
            fmt, s = scheme_of(m)
            schemes.setdefault(json.dumps(s, sort_keys=True), (fmt, s))
    if not schemes:
        raise BadInput("the checkpoint has no quantized Linear to describe")
    # a causal LM's head is a Linear to transformers and vLLM even when lathe ties it to the
    # embedding (no module here): unquantized, it must be named, or it is read as quantized
    if "lm_head" not in ignore and not any(n == "lm_head" for n, _ in model.named_modules()) \
            and _has_lm_head(model):
        ignore.append("lm_head")
    fmts = {f for f, _ in schemes.values()}
    groups = {f"group_{i}": {"targets": ["Linear"], **s, "format": f}
              for i, (f, s) in enumerate(schemes.values())}
    if len(groups) > 1:
        raise BadInput("the checkpoint mixes quantization schemes; one scheme per export is supported")
    return {"quant_method": "compressed-tensors", "format": fmts.pop(), "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}


def _has_lm_head(model) -> bool:
    c = getattr(model, "config", None)
    arch = (c.get("architectures") if isinstance(c, dict) else getattr(c, "architectures", None)) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch)


def export_compressed_tensors(src, out) -> Path:
    """Write `out` in compressed-tensors layout from lathe compressed directory `src`."""
    from lathe.io import claim
    from lathe.source import open_source

    source = open_source(src)
    if not source.is_compressed:
        raise BadInput(f"{src} is not a lathe compressed checkpoint (compress it first)")
    with claim(out, "compressed-tensors", [source.path]) as out:
        return _write(source, out)


def _write(source, out):
    from safetensors.torch import save_file

    from lathe.compress.checkpoint import COPY, load
    from lathe.io import atomic_dir

    model = load(source.path)
    qcfg = quantization_config(model)
    sd, _, _ = compressed_tensors_state(model)
    config = dict(source.config, quantization_config=qcfg)
    with atomic_dir(out) as tmp:
        save_file({k: v.cpu() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in COPY:
            if name != "config.json" and (source.path / name).is_file():
                shutil.copy2(source.path / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out


def dequantize_state(sd: dict, name: str, group_size: int | None = None) -> torch.Tensor:
    """The fp32 weight of module `name` from a compressed-tensors state dict (reference used by
    the tests: written from the format's description, not from lathe's modules)."""
    if f"{name}.weight_packed" in sd:
        N, K = (int(x) for x in sd[f"{name}.weight_shape"])
        q = unpack_int4_rows(sd[f"{name}.weight_packed"], K).float() - 8
        zp = sd.get(f"{name}.weight_zero_point")
        G = sd[f"{name}.weight_scale"].shape[1]
        z = torch.zeros(N, G) if zp is None else unpack_int4_rows(zp.t().contiguous(), N).t().float() - 8
        g = K // G
        return ((q.view(N, G, g) - z[..., None]) * sd[f"{name}.weight_scale"][..., None]).reshape(N, K)
    return sd[f"{name}.weight"].float() * sd[f"{name}.weight_scale"]

