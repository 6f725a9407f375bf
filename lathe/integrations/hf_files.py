"""What a lathe output carries so the Hugging Face ecosystem can read it: config.json's
`quantization_config` (quant_method "lathe"), the tokenizer and sentence-transformers files of
the source, a state dict without tied duplicates, and the sentinel (see
lathe.integrations.transformers_quantizer)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch.nn as nn

# files and folders copied from the source beside the weights (whatever of them exist)
CARRY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
               "spiece.model", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
               "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json",
               "generation_config.json", "preprocessor_config.json", "README.md")


def carry_files(src_dir: Path, out_dir: Path):
    """Copy the tokenizer / processor files and sentence-transformers' module folders (those
    modules.json names other than the transformer itself: 1_Pooling, 2_Normalize, ...)."""
    import json

    for name in CARRY_FILES:
        if (src_dir / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(src_dir / name, out_dir / name)
    mj = src_dir / "modules.json"
    if mj.is_file():
        try:
            mods = json.loads(mj.read_text())
        except ValueError:
            return
        for m in mods if isinstance(mods, list) else []:
            p = (m or {}).get("path") or ""
            if p and (src_dir / p).is_dir() and ".." not in Path(p).parts:
                shutil.copytree(src_dir / p, out_dir / p, dirs_exist_ok=True)


def state_dict(model: nn.Module) -> dict:
    """Tensors to save: contiguous CPU copies, each storage once (a tied lm_head shares the
    embedding's storage: it is dropped and re-tied on load, as save_pretrained does)."""
    out, seen = {}, {}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else None
        if key is not None and key in seen and k in tied:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def pick_sentinel(sd: dict, modules: dict) -> str | None:
    """A small floating 1-D tensor outside the quantized modules (a norm weight): stored as
    [1, n] so that transformers without lathe refuses the checkpoint (size mismatch)."""
    quant = tuple(n + "." for n in modules)
    for k, v in sd.items():
        if v.dim() == 1 and v.is_floating_point() and not k.startswith(quant) and k.endswith("weight"):
            return k
    return None


def quantization_config(manifest: dict, sentinel: str | None) -> dict:
    return {"quant_method": "lathe", "format_version": manifest["format_version"],
            "lathe_version": manifest["lathe_version"], "recipe": manifest["recipe"].get("name"),
            "sentinel": sentinel, "transforms": manifest["transforms"],
            "modules": {n: {"class": e["class"], "args": e["args"]} for n, e in manifest["modules"].items()}}


def unsentinel(tensors: dict, manifest: dict) -> dict:
    """lathe's own loader: the sentinel tensor back to its real shape."""
    s = (manifest or {}).get("sentinel")
    if s and s in tensors and tensors[s].dim() >= 2 and tensors[s].shape[0] == 1:
        tensors[s] = tensors[s].reshape(tensors[s].shape[1:])
    return tensors


def is_generic(config: dict) -> bool:
    from lathe.models import family_of
    return family_of(config) is None


__all__ = ["carry_files", "state_dict", "pick_sentinel", "quantization_config", "unsentinel", "is_generic"]
