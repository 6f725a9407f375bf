"""Language-model quality: token-level perplexity on held-out Python source.

The corpus is the Python standard library's own source (offline, on every machine): every
``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, sorted by path, except anything under
a ``site-packages`` folder (installed packages are not the standard library). The split rule
lives in lathe/corpus.py and only there; this module and scripts/train_decoder.py import it:

    held out  <=>  int(sha1(relative posix path).hexdigest(), 16) % 10 == 0

(about a tenth of the files, the same files on every machine with the same Python version).
Files that are not valid UTF-8 are skipped on both sides.

perplexity(): each text is tokenized on its own, prefixed by the end-of-text token (the
training data's file separator), and cut into non-overlapping windows of seq_len inputs; each
window scores the next token at every position, so every token after the prefix is scored
exactly once, with the context its window gives it. The token budget (max_tokens) is spread
evenly over the texts so that long files do not dominate. Deterministic: no sampling.
"""
from __future__ import annotations

import math

from lathe.corpus import (EOT, HELDOUT_MODULUS, as_tokenizers, heldout_texts, is_heldout,  # noqa: F401
                          read_source, split_files, stdlib_files, stdlib_root, train_texts)


# ----------------------------------------------------------------------------- perplexity


def windows(tokenizer, texts, seq_len: int = 256, max_tokens: int = 32768):
    """[(input ids, target ids)] lists of at most seq_len each, about max_tokens targets in all."""
    tok = as_tokenizers(tokenizer)
    tok.no_truncation()
    tok.no_padding()
    texts = [t for t in texts if t]
    if not texts:
        return []
    eot = tok.token_to_id(EOT)
    per_text = max(seq_len, math.ceil(max_tokens / len(texts) / seq_len) * seq_len)
    out, total = [], 0
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = ([eot] if eot is not None else []) + enc.ids
        for s in range(0, min(len(ids) - 1, per_text), seq_len):
            tgt = ids[s + 1:s + 1 + seq_len]
            out.append((ids[s:s + len(tgt)], tgt))
            total += len(tgt)
            if total >= max_tokens:
                return out
    return out


def score(model_or_run_fn, tokenizer, texts, seq_len: int = 256, max_tokens: int = 32768,
          batch_size: int = 16) -> dict:
    """{"perplexity", "nll" (mean, nats/token), "tokens", "windows", "bytes_per_token"... }.

    model_or_run_fn: an nn.Module called as model(input_ids=..., attention_mask=...) (run in
    eval mode, no grad) or a function (input_ids, attention_mask) -> logits [B, S, V]; an
    output with .logits (transformers) or a tuple (logits first) is accepted too.
    """
    import torch
    import torch.nn.functional as F

    ws = windows(tokenizer, texts, seq_len, max_tokens)
    if not ws:
        raise ValueError("no tokens to score: texts are empty")
    is_module = isinstance(model_or_run_fn, torch.nn.Module)
    was_training = is_module and model_or_run_fn.training
    if is_module:
        model_or_run_fn.eval()
    nll, n = 0.0, 0
    try:
        with torch.inference_mode():
            for i in range(0, len(ws), batch_size):
                chunk = ws[i:i + batch_size]
                L = max(len(x) for x, _ in chunk)
                ids = torch.zeros(len(chunk), L, dtype=torch.long)
                tgt = torch.full((len(chunk), L), -100, dtype=torch.long)
                mask = torch.zeros(len(chunk), L, dtype=torch.long)
                for j, (x, y) in enumerate(chunk):
                    ids[j, :len(x)] = torch.tensor(x)
                    tgt[j, :len(y)] = torch.tensor(y)
                    mask[j, :len(x)] = 1
                if is_module:
                    out = model_or_run_fn(input_ids=ids, attention_mask=mask)
                else:
                    out = model_or_run_fn(ids, mask)
                logits = getattr(out, "logits", out)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                       ignore_index=-100, reduction="sum")
                nll += float(loss)
                n += int((tgt != -100).sum())
    finally:
        if was_training:
            model_or_run_fn.train()
    mean = nll / n
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": n, "windows": len(ws),
            "seq_len": seq_len}


def perplexity(model_or_run_fn, tokenizer, texts, seq_len: int = 256, max_tokens: int = 32768,
               batch_size: int = 16) -> float:
    """Token-level perplexity, exp(mean next-token NLL), over texts (see score)."""
    return score(model_or_run_fn, tokenizer, texts, seq_len, max_tokens, batch_size)["perplexity"]


def heldout_perplexity(model_or_run_fn, tokenizer, n_files: int = 64, seq_len: int = 256,
                       max_tokens: int = 32768) -> dict:
    """The default evaluation: 64 held-out files evenly spaced, 32768 scored tokens (512 a
    file at most), windows of 256."""
    return score(model_or_run_fn, tokenizer, heldout_texts(n_files), seq_len, max_tokens)
