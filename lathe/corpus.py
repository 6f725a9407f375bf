"""The text corpus lathe trains, calibrates and scores decoders on: the Python standard
library's own source (offline, on every machine), split by one rule into train and held-out
files, and the tokenizer coercion its users share. bench/perplexity.py scores on it,
compress/distill.py and scripts/train_decoder.py train on it (core layer: no torch).

    held out  <=>  int(sha1(relative posix path).hexdigest(), 16) % 10 == 0
"""
from __future__ import annotations

import hashlib
from pathlib import Path

EOT = "<|endoftext|>"
HELDOUT_MODULUS = 10  # held out: sha1(relative path) % HELDOUT_MODULUS == 0


# ----------------------------------------------------------------------------- the split


def stdlib_root() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str) -> bool:
    """The split rule. rel_path: the file's path relative to the stdlib root, '/'-separated."""
    return int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest(), 16) % HELDOUT_MODULUS == 0


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every *.py of the standard library, sorted by path."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if "site-packages" in rel.parts or "__pycache__" in rel.parts or not f.is_file():
            continue
        out.append((rel.as_posix(), f))
    return sorted(out)


def split_files(root: Path | None = None) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(train, held_out) lists of (relative path, path), each sorted by path."""
    train, held = [], []
    for rel, f in stdlib_files(root):
        (held if is_heldout(rel) else train).append((rel, f))
    return train, held


def read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _texts(files, n_files):
    texts = [t for t in (read_source(f) for _, f in files) if t]
    if n_files is not None and n_files < len(texts):
        # evenly spaced over the sorted list: a spread over the whole library, deterministic
        texts = [texts[i * len(texts) // n_files] for i in range(n_files)]
    return texts


def heldout_texts(n_files: int | None = None) -> list[str]:
    """The held-out files' texts (all of them, or n_files evenly spaced over the sorted list)."""
    return _texts(split_files()[1], n_files)


def train_texts(n_files: int | None = None) -> list[str]:
    return _texts(split_files()[0], n_files)


def as_tokenizers(tokenizer):
    """A `tokenizers.Tokenizer` from one, a lathe.text.Tokenizer, a transformers fast
    tokenizer, a tokenizer.json path or a model directory."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        p = Path(tokenizer)
        return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
    for attr in ("tok", "backend_tokenizer"):
        inner = getattr(tokenizer, attr, None)
        if isinstance(inner, Tokenizer):
            return inner
    raise TypeError(f"cannot use {type(tokenizer).__name__} as a tokenizer")
