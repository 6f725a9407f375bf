"""Text for evaluation and calibration, and tokenization, all offline.

- eval_sentences(): lathe's fixed, varied evaluation set (data/sentences.txt, 300 lines).
- calibration_texts(): paragraphs of the Python standard library's docstrings; kept apart
  from the evaluation set so quality is never measured on the calibration data.
- training_texts(): tens of thousands of English sentences for distillation: every docstring
  in the standard library (modules, classes, functions) and the Python documentation's topic
  pages shipped with it (pydoc_data), split into sentences and pairs of sentences. Offline,
  and disjoint from the evaluation set.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from lathe.errors import BadInput

DATA = Path(__file__).parent / "data"


def eval_sentences() -> list[str]:
    return [l for l in (DATA / "sentences.txt").read_text(encoding="utf-8").splitlines() if l.strip()]


def read_lines(path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"calibration file not found: {p}")
    try:
        lines = [l.strip() for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
    except UnicodeDecodeError:
        raise BadInput(f"calibration file {p} is not UTF-8 text") from None
    if not lines:
        raise BadInput(f"calibration file {p} is empty: it needs one text a line")
    return lines


@functools.lru_cache(maxsize=4)
def calibration_texts(n: int = 128) -> tuple:
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(stdlib.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for para in (doc or "").split("\n\n"):
            para = " ".join(para.split())
            if 40 <= len(para) <= 600:
                out.append(para)
        if len(out) >= n:
            break
    return tuple(out[:n])


def _prose(t: str) -> bool:
    letters = sum(c.isalpha() or c == " " for c in t)
    return 20 <= len(t) <= 400 and letters >= 0.85 * len(t) and t[0].isupper()


@functools.lru_cache(maxsize=1)
def training_texts() -> tuple:
    """Sentences (and pairs of consecutive sentences) of the stdlib's docstrings and
    pydoc_data's topic pages, prose only, deduplicated, in a fixed order."""
    import ast
    import re
    import sysconfig

    split = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
    paragraphs = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib).parts
        if "site-packages" in rel or any(p in ("test", "tests", "idle_test") for p in rel):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paragraphs.extend(doc.split("\n\n"))
    try:
        from pydoc_data.topics import topics

        for page in topics.values():
            paragraphs.extend(page.split("\n\n"))
    except ImportError:  # some distributions strip pydoc_data
        pass
    out, seen = [], set()
    for para in paragraphs:
        sents = [s for s in split.split(" ".join(para.split())) if _prose(s)]
        for i, s in enumerate(sents):
            for t in (s, f"{s} {sents[i + 1]}" if i + 1 < len(sents) else None):
                if t and _prose(t) and t not in seen:
                    seen.add(t)
                    out.append(t)
    held = set(eval_sentences())
    return tuple(t for t in out if t not in held)


def augmented_texts(model_dir, seed: int = 0) -> list:
    """Distillation text for encoders: training_texts(), plus a short span (1-6 words) of each,
    plus as many random word sequences (1-16 whole words of the model's own vocabulary, random
    case and punctuation). Docstrings alone are long technical prose; the spans and word
    sequences teach the student the short, conversational inputs a sentence encoder also
    meets, without any evaluation data (data-free distillation in the style of random-token
    inputs)."""
    import json
    import random

    rng = random.Random(seed)
    base = list(training_texts())
    spans = []
    for t in base:
        w = t.split()
        n = rng.randint(1, min(6, len(w)))
        i = rng.randint(0, len(w) - n)
        spans.append(" ".join(w[i:i + n]))
    try:
        vocab = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    except (OSError, KeyError, ValueError):
        vocab = {}
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 1)
    salad = []
    if words:
        for _ in range(len(base)):
            n = rng.choice([1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, 16])
            t = " ".join(rng.choice(words) for _ in range(n))
            t = t.capitalize() if rng.random() < 0.6 else t
            salad.append(t + rng.choice(["", ".", "!", "?", "...", "?!"]))
    return base + spans + salad


@dataclass(frozen=True)
class TokenizerSettings:
    """How a model family tokenizes (its adapter's `tokenizer`, lathe.models.base); lowercasing
    and special tokens are the tokenizer.json's own."""
    pad_token: str = "[PAD]"
    pad_id: int = 0
    max_length: int = 512  # truncation when no seq_len is asked for
    eot: str | None = None  # the end-of-text token that separates training documents


class Tokenizer:
    """A checkpoint's tokenizer.json through the `tokenizers` library (no transformers import),
    padded and truncated as `settings` say. lathe.models.tokenizer(model_dir) passes the
    model family's settings; without them, the protocol's defaults."""

    def __init__(self, model_dir, settings: TokenizerSettings | None = None):
        from tokenizers import Tokenizer as _T

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise BadInput(f"{model_dir} has no tokenizer.json")
        self.tok = _T.from_file(str(path))
        self.settings = settings if settings is not None else TokenizerSettings()

    @property
    def max_length(self) -> int:
        return self.settings.max_length

    def __call__(self, texts, seq_len: int | None = None):
        """Dict of int64 tensors; padded to seq_len (and truncated) when given, else to the
        longest text."""
        import torch

        tok, s = self.tok, self.settings
        tok.enable_truncation(max_length=seq_len or s.max_length)
        if seq_len:
            tok.enable_padding(length=seq_len, pad_id=s.pad_id, pad_token=s.pad_token)
        else:
            tok.enable_padding(pad_id=s.pad_id, pad_token=s.pad_token)
        enc = tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        types = torch.tensor([e.type_ids for e in enc], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def batches(tokenizer, texts, batch_size: int = 16, seq_len: int | None = None):
    return [tokenizer(texts[i:i + batch_size], seq_len) for i in range(0, len(texts), batch_size)]
