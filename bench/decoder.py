"""The decoder scenario: prefill latency, per-token decode latency and tokens/s at a prompt and
generation length, with held-out perplexity beside speed (against the fp32 source model)."""
from __future__ import annotations

from lathe.errors import BadInput

import sys
import time

import torch

from lathe.bench.report import SCHEMA_VERSION
from lathe.bench.timing import seconds
from lathe.bench.stats import summarize, time_fn


def _prompt(tok, batch: int, prompt_len: int) -> torch.Tensor:
    from lathe.bench.perplexity import heldout_texts

    ids = tok.encode("\n".join(heldout_texts(4))).ids
    reps = (prompt_len * batch) // max(1, len(ids)) + 1
    ids = (ids * reps)[: prompt_len * batch]
    return torch.tensor(ids, dtype=torch.long).view(batch, prompt_len)


def measure(model, tok, batch: int, prompt_len: int, gen_len: int, min_runs: int, min_seconds: float,
            max_seconds: float | None) -> dict:
    x = _prompt(tok, batch, prompt_len)
    with torch.inference_mode():
        prefill = time_fn(lambda: model(x, use_cache=True), min_runs=min_runs, min_seconds=min_seconds,
                          max_seconds=max_seconds)
        step_ms = []

        def generate():
            logits, cache = model(x, use_cache=True)
            nxt = logits[:, -1:].argmax(-1)
            for _ in range(gen_len):
                out = []
                step_ms.append(seconds(lambda: out.append(model(nxt, past_key_values=cache, use_cache=True))) * 1e3)
                logits, cache = out[0]
                nxt = logits[:, -1:].argmax(-1)
        time_fn(generate, warmup=1, min_runs=max(1, min_runs // 10), min_seconds=min_seconds,
                max_seconds=max_seconds)
    p, d = summarize(prefill), summarize(step_ms)
    return {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
            "prefill": p, "decode_per_token": d,
            "prefill_tokens_per_s": batch * prompt_len * 1e3 / p["p50_ms"],
            "decode_tokens_per_s": batch * 1e3 / d["p50_ms"]}


def check_lengths(config: dict, prompt_len, gen_len):
    """A prompt and a generation of at least one token each, within the model's positions."""
    for name, v in (("--prompt-len", prompt_len), ("--gen-len", gen_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadInput(f"{name} must be a positive integer, got {v!r}")
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and prompt_len + gen_len > limit:
        raise BadInput(f"--prompt-len {prompt_len} + --gen-len {gen_len} exceeds the model's "
                       f"max_position_embeddings ({limit})")


def run(target, batches=(1,), prompt_len: int = 128, gen_len: int = 32, min_runs: int = 20,
        min_seconds: float = 2.0, max_seconds: float | None = 30.0, log=print, backends=()) -> dict:
    """backends: torchao-int8 / torchao-int4 add torchao's quantize_ of transformers' model
    (lathe.bench.torchao_backend) beside lathe fp32 and the compressed model."""
    from lathe.compress.checkpoint import load
    from lathe.bench.machine import describe
    from lathe.bench.perplexity import as_tokenizers, heldout_texts, perplexity
    from lathe.source import open_source, recorded_source

    tgt = open_source(target)
    check_lengths(tgt.config, prompt_len, gen_len)
    src = recorded_source(tgt) if tgt.is_compressed else tgt
    tok = as_tokenizers(src.path)
    texts = heldout_texts(16)
    doc = {"schema_version": SCHEMA_VERSION, "kind": "decoder", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": describe(), "config": {"target": str(tgt.path), "source": str(src.path),
                                             "prompt_len": prompt_len, "gen_len": gen_len},
           "interrupted": False, "results": [], "quality": {}}
    models = [("fp32", lambda: load(src.path))]
    if tgt.is_compressed:
        models.append((tgt.manifest["recipe"]["name"], lambda: load(tgt.path)))
    for kind in ("torchao-int8", "torchao-int4"):
        if kind in backends:
            from lathe.bench import torchao_backend as tao
            try:
                tao.check(kind)
            except tao.Unavailable as e:
                doc.setdefault("skipped", {})[kind] = str(e)
                log(f"{kind}: skipped: {e}")
                continue
            models.append((kind, lambda kind=kind: tao.quantized(src.path, kind)[0]))
    try:
        for label, build in models:
            m = build()
            ppl = perplexity(m, tok, texts, max_tokens=8192)
            name = label if label.startswith("torchao") else f"lathe {label}"
            doc["quality"][name] = {"perplexity": ppl}
            for b in batches:
                log(f"{label}: batch {b}, prompt {prompt_len}, generate {gen_len} ...")
                r = measure(m, tok, b, prompt_len, gen_len, min_runs, min_seconds, max_seconds)
                doc["results"].append({"backend": name, **r})
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    return doc


def table(doc: dict) -> str:
    lines = [f"{'backend':22} {'batch':>5} {'prefill p50 ms':>15} {'decode p50 ms/tok':>18} "
             f"{'decode tok/s':>12} {'perplexity':>10}"]
    for r in doc["results"]:
        q = doc["quality"].get(r["backend"], {})
        lines.append(f"{r['backend']:22} {r['batch']:5d} {r['prefill']['p50_ms']:15.2f} "
                     f"{r['decode_per_token']['p50_ms']:18.2f} {r['decode_tokens_per_s']:12.1f} "
                     f"{q.get('perplexity', float('nan')):10.2f}")
    lines += [f"{k}: skipped: {why}" for k, why in doc.get("skipped", {}).items()]
    return "\n".join(lines)
