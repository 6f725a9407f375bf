"""Compressed checkpoint directories: packed tensors in safetensors, the source's config and
tokenizer files, and lathe_manifest.json. Written under a temporary name, fsynced, then
renamed into place, so an interrupted run never leaves a directory that looks complete and
never damages the previous output."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from lathe.errors import BadInput
from lathe.source import MANIFEST, Source, open_source, read_tensors, source_hash

FORMAT_VERSION = 1
COPY = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
        "special_tokens_map.json", "sentence_bert_config.json", "modules.json")


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(out: Path):
    """Context manager: yields a temp folder beside `out`; on success swaps it into place."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
            _fsync_dir(tmp)
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
            os.replace(tmp, out)
            _fsync_dir(out.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return cm()


def atomic_file(out: Path):
    """Context manager: yields a temp file path beside `out`, renamed over it on success."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    return cm()


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

    out = Path(out)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "lathe_version": lathe.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_type": src.model_type,
        "recipe": recipe,
        "source": {"path": str(src.path), "sha256": source_hash(src)},
        **_lineage(src),
        "transforms": list(getattr(model, "applied_transforms", [])),
        "modules": describe_modules(model),
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in sd.items()},
        "report": report or {},
    }
    with atomic_dir(out) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt", "lathe": "1"})
        for name in COPY:
            if (src.path / name).is_file():
                shutil.copy2(src.path / name, tmp / name)
        config = getattr(model, "config", None)
        if isinstance(config, dict) and config != src.config:
            # structured pruning changed the shapes: build_model reads them from here
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # The manifest goes last: its presence marks a complete compressed checkpoint.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def build_model(src: Source, device="cpu") -> nn.Module:
    """Rebuild the model from a source (HF or compressed): build on the meta device, swap in
    the quantized modules the manifest names, load the tensors with assign=True (no copy)."""
    from lathe.compress.modules import QUANT_MODULES
    from lathe.models import model_class
    from lathe.models.base import adapter_of

    cls = model_class(src.config)
    with torch.device("meta"):
        model = cls(src.config)
        for t in (src.manifest or {}).get("transforms", []):
            model.transform(t)
        adapter = adapter_of(model)
        for name, entry in (src.manifest or {}).get("modules", {}).items():
            qcls = QUANT_MODULES.get(entry.get("class"))
            if qcls is None:  # e.g. LowRankLinear: registered when its plugin is imported
                from lathe.compress.config import ensure_registered
                ensure_registered()
                qcls = QUANT_MODULES.get(entry.get("class"))
            if qcls is None:
                raise BadInput(f"{src.path}: manifest names unknown module class {entry.get('class')!r}")
            parent, _, leaf = name.rpartition(".")
            try:
                owner = model.get_submodule(parent) if parent else model
            except AttributeError:
                raise BadInput(f"{src.path}: manifest names module {name!r} that the model lacks") from None
            setattr(owner, leaf, qcls(**entry["args"]))
            if entry["args"].get("act") not in (None, "none") and adapter.fusable_act(name):
                adapter.mark_act_fused(name)
    tensors = read_tensors(src)
    want = model.state_dict()
    missing = [k for k in want if k not in tensors]
    if missing:
        raise BadInput(f"{src.path}: weights lack {len(missing)} tensors the model needs, e.g. {missing[0]}")
    for k, v in want.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise BadInput(f"{src.path}: tensor {k} has shape {tuple(tensors[k].shape)}, "
                           f"config.json implies {tuple(v.shape)}")
    model.load_state_dict({k: tensors[k] for k in want}, assign=True, strict=True)
    model = model.to(device).eval()
    for m in model.modules():
        if hasattr(m, "prepare"):
            m.prepare()
    return model


def load(path, device="cpu") -> nn.Module:
    return build_model(open_source(path), device)
