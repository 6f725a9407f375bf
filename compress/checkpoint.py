"""Compressed checkpoint directories: packed tensors in safetensors, the source's config and
tokenizer files, and lathe_manifest.json. Written by lathe.io.atomic_dir (temporary name,
fsync, rename), so an interrupted run never leaves a directory that looks complete and
never damages the previous output."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn

from lathe.errors import BadInput
from lathe.io import atomic_dir, atomic_file  # noqa: F401 (lathe's one atomic writer)
from lathe.source import MANIFEST, Source, open_source, read_tensors, source_hash

FORMAT_VERSION = 1
COPY = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
        "special_tokens_map.json", "sentence_bert_config.json", "modules.json")


def describe_modules(model: nn.Module) -> dict:
    """Manifest entries for every quantized module: its class, constructor args and format."""
    from lathe.compress.modules import QUANT_MODULES

    out = {}
    for name, m in model.named_modules():
        if type(m).__name__ in QUANT_MODULES:
            out[name] = {"class": type(m).__name__, "args": m.manifest_args()}
            if hasattr(m, "format"):  # quantized modules; a low-rank Linear has none
                out[name]["format"] = m.format.manifest()
    return out


def _lineage(src: Source) -> dict:
    """Compressing a compressed (pruned/distilled, not quantized) checkpoint again: the
    manifest keeps pointing at the original model (the quality reference) and records the
    intermediate checkpoint as the parent."""
    if not src.is_compressed:
        return {}
    m = src.manifest
    return {"source": m["source"],
            "parents": m.get("parents", []) + [{"path": str(src.path), "sha256": source_hash(src),
                                                "recipe": m.get("recipe", {})}]}


def save(model: nn.Module, src: Source, out, recipe: dict, report: dict | None = None) -> Path:
    from safetensors.torch import save_file

    import lathe

    from lathe.integrations import hf_files

    out = Path(out)
    sd = hf_files.state_dict(model)
    manifest = {
        "format_version": FORMAT_VERSION,
        "lathe_version": lathe.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_type": src.model_type,
        "recipe": recipe,
        "source": {"path": str(src.path.resolve()), "sha256": source_hash(src)},
        **_lineage(src),
        "transforms": list(getattr(model, "applied_transforms", [])),
        "modules": describe_modules(model),
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in sd.items()},
        "report": report or {},
    }
    # transformers reads the output through lathe's quantizer, and refuses it without lathe
    sentinel = hf_files.pick_sentinel(sd, manifest["modules"]) if manifest["modules"] else None
    if sentinel:
        manifest["sentinel"] = sentinel
        sd[sentinel] = sd[sentinel][None]
    with atomic_dir(out) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt", "lathe": "1"})
        for name in COPY:
            if (src.path / name).is_file():
                shutil.copy2(src.path / name, tmp / name)
        hf_files.carry_files(src.path, tmp)
        config = getattr(model, "config", None)
        config = dict(config) if isinstance(config, dict) and config != src.config else dict(src.config)
        # structured pruning changed the shapes: build_model reads them from here
        if manifest["modules"] or manifest["transforms"]:
            config["quantization_config"] = hf_files.quantization_config(manifest, sentinel)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # The manifest goes last: its presence marks a complete compressed checkpoint.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


# Tensors Hugging Face checkpoints carry that lathe's models do not use (BERT's pooler: lathe
# returns last_hidden_state; buffers that are recomputed). Any other extra tensor is an error.
UNUSED_KEYS = ("*position_ids", "*.rotary_emb.inv_freq", "pooler.*")


def check_tensors(src: Source, tensors: dict, want: dict) -> None:
    """Every tensor the model needs, none it does not (config.json saying 2 layers where the
    weights hold 4 must not drop layers silently), shapes as config.json implies, dtypes of the
    right kind (mixed float dtypes are cast to the checkpoint's main one, and said so), and
    finite values everywhere (a NaN in an embedding breaks every output)."""
    import fnmatch
    import logging

    missing = [k for k in want if k not in tensors]
    if missing:
        raise BadInput(f"{src.path}: weights lack {len(missing)} tensors the model needs, e.g. {missing[0]}")
    extra = [k for k in tensors if k not in want and not any(fnmatch.fnmatch(k, p) for p in UNUSED_KEYS)]
    if extra:
        raise BadInput(f"{src.path}: weights hold {len(extra)} tensors the model (as config.json describes "
                       f"it) does not have, e.g. {extra[0]}")
    for k, v in want.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise BadInput(f"{src.path}: tensor {k} has shape {tuple(tensors[k].shape)}, "
                           f"config.json implies {tuple(v.shape)}")
        t = tensors[k]
        if t.dtype != v.dtype and not (t.is_floating_point() and v.is_floating_point()):
            raise BadInput(f"{src.path}: tensor {k} is {str(t.dtype).replace('torch.', '')}, the model "
                           f"needs {str(v.dtype).replace('torch.', '')}")
    plain = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # not FP8 codes
    floats = {}
    for k, v in want.items():
        if tensors[k].dtype in plain:
            floats[tensors[k].dtype] = floats.get(tensors[k].dtype, 0) + tensors[k].numel()
    if len(floats) > 1 and not src.is_compressed:  # one F16 tensor in an F32 checkpoint: one dtype, or no forward pass runs
        main = max(floats, key=floats.get)
        cast = [k for k in want if tensors[k].dtype in plain and tensors[k].dtype != main]
        for k in cast:
            tensors[k] = tensors[k].to(main)
        logging.getLogger("lathe").warning("%s: cast %d tensor(s) to %s, the checkpoint's main dtype (e.g. %s)",
                                           src.path, len(cast), str(main).replace("torch.", ""), cast[0])
    for k in want:
        t = tensors[k]
        if t.dtype in plain and not bool(torch.isfinite(t).all()):
            raise BadInput(f"{src.path}: tensor {k} holds NaN or Inf values")


def build_model(src: Source, device="cpu", dtype=None) -> nn.Module:
    """Rebuild the model from a source (HF or compressed): build on the meta device, swap in
    the quantized modules the manifest names, load the tensors with assign=True (no copy).

    Tensors go from the file straight to `device`. dtype (float16/bfloat16/float32, or None
    for the checkpoint's own dtypes) is the activation dtype: plain floating-point weights
    are converted to it there, once, and each quantized module's prepare(dtype) stores its
    scales/bias in the dtype its kernel reads, so forward converts nothing."""
    from lathe.compress.modules import module_class
    from lathe.integrations import hf_files
    from lathe.models import model_class
    from lathe.models.base import adapter_of

    if hf_files.is_generic(src.config):  # any other transformers model (lathe.models.generic)
        from lathe.models.generic import load_source
        if src.is_compressed:
            import lathe.integrations.transformers_quantizer  # noqa: F401  (registers quant_method "lathe")
        return load_source(src, device)
    cls = model_class(src.config)
    with torch.device("meta"):
        model = cls(src.config)
        for t in (src.manifest or {}).get("transforms", []):
            model.transform(t)
        adapter = adapter_of(model)
        for name, entry in (src.manifest or {}).get("modules", {}).items():
            qcls = module_class(entry.get("class"), f"{src.path}: manifest")
            parent, _, leaf = name.rpartition(".")
            try:
                owner = model.get_submodule(parent) if parent else model
            except AttributeError:
                raise BadInput(f"{src.path}: manifest names module {name!r} that the model lacks") from None
            setattr(owner, leaf, qcls(**entry["args"]))
            if entry["args"].get("act") not in (None, "none") and adapter.fusable_act(name):
                adapter.mark_act_fused(name)
    device = _check_device(device)
    if dtype is not None and dtype not in LOAD_DTYPES:
        raise BadInput(f"dtype must be one of {', '.join(map(str, LOAD_DTYPES))}, got {dtype}")
    tensors = hf_files.unsentinel(read_tensors(src, device), src.manifest)
    if not src.is_compressed and hasattr(cls, "from_hf_names"):  # a checkpoint transformers saved
        tensors = cls.from_hf_names(tensors, src.config)
    want = model.state_dict()
    check_tensors(src, tensors, want)
    quantized = tuple(f"{n}." for n in (src.manifest or {}).get("modules", {}))
    if dtype is not None:  # quantized modules' buffers: their prepare(dtype) decides
        for k in want:
            t = tensors[k]
            if t.is_floating_point() and t.dtype != dtype and t.element_size() > 1 \
                    and not k.startswith(quantized):
                tensors[k] = t.to(dtype)
    model.load_state_dict({k: tensors[k] for k in want}, assign=True, strict=True)
    model = model.to(device).eval()  # a no-op for loaded tensors (already there)
    for m in model.modules():
        if hasattr(m, "prepare"):
            m.prepare(dtype)
    return model


LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_device(device) -> torch.device:
    """A torch.device that exists here; a BadInput naming the problem otherwise (never a
    CUDA traceback deep inside the load)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInput(f"unknown device {device!r} (expected cpu or cuda[:N])") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"device {device!r} asked for, but this machine has no usable CUDA GPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type not in ("cpu", "meta"):
        raise BadInput(f"unsupported device {device!r} (expected cpu or cuda[:N])")
    return dev


def load(path, device="cpu", dtype=None) -> nn.Module:
    return build_model(open_source(path), device, dtype)
