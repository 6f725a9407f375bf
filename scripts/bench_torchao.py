"""lathe against torchao on CPU, one run, interleaved: MiniLM (b1/b8, seq 128; min/mean cosine
of mean-pooled embeddings vs fp32) and lathe's decoder-lm (prefill b1 s128 and greedy decode
per token; held-out perplexity). Backends: transformers fp32, torchao int8 dynamic (eager and,
with --compile, under torch.compile as torchao recommends), lathe int8, lathe int4-rtn, and
torchao int4 weight-only where a CPU kernel exists (else its reason is printed).

Every round calls each backend once, in a rotating order; the ratio to fp32 is taken per
round and its median and quartiles reported (a shared machine's noise hits all alike).

    cd /tmp && /path/to/.venv/bin/python /path/to/scripts/bench_torchao.py --rounds 15 --md out.md
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def rounds_ms(fns: dict, rounds: int, warmup: int = 2) -> dict:
    names = list(fns)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
    return times


def ratio_stats(times: dict, ref: str) -> dict:
    out = {}
    for n, t in times.items():
        r = [a / b for a, b in zip(times[ref], t)]  # > 1: faster than fp32
        q = statistics.quantiles(r, n=4) if len(r) >= 4 else (min(r), 0, max(r))
        out[n] = {"p50_ms": statistics.median(t), "speedup": statistics.median(r), "q25": q[0], "q75": q[2]}
    return out


def encoder(work: Path, rounds: int, compile_: bool, log):
    import lathe
    from lathe import text
    from lathe.bench import torchao_backend as tao
    from lathe.bench.quality import cosine_stats, embeddings
    from lathe.models.generic import adapt, reference_model
    from lathe.source import default_checkpoint

    src = default_checkpoint()
    models, notes = {"transformers fp32": adapt(reference_model(src))}, []
    models["torchao int8 (eager)"], sz_ao = tao.quantized(src, "torchao-int8")
    if compile_:
        models["torchao int8 (torch.compile)"] = torch.compile(tao.quantized(src, "torchao-int8")[0])
    try:
        models["torchao int4"], _ = tao.quantized(src, "torchao-int4")
    except tao.Unavailable as e:
        notes.append(f"torchao-int4: {e}")
    for rec in ("int8", "int4-rtn"):
        models[f"lathe {rec}"] = lathe.load(lathe.compress_checkpoint(src, rec, work / f"minilm-{rec}"))
    tok = text.Tokenizer(src)
    sents = text.eval_sentences()
    log("MiniLM quality ...")
    with torch.inference_mode():
        emb = {n: embeddings(lambda b, m=m: m(**b), tok, sents) for n, m in models.items()}
    quality = {n: cosine_stats(emb["transformers fp32"], e) for n, e in emb.items()}
    rows = []
    for batch in (1, 8):
        x = tok((sents * 8)[:batch], seq_len=128)
        log(f"MiniLM b{batch} s128: {rounds} rounds ...")
        st = ratio_stats(rounds_ms({n: (lambda m=m: m(**x)) for n, m in models.items()}, rounds), "transformers fp32")
        rows += [{"model": "MiniLM", "shape": f"b{batch} s128", "backend": n, **st[n],
                  "quality": f"min cos {quality[n]['min_cos']:.4f} / mean {quality[n]['mean_cos']:.4f}"}
                 for n in models]
    return rows, notes


def decoder(work: Path, rounds: int, gen: int, log):
    import lathe
    from lathe.bench import torchao_backend as tao
    from lathe.bench.decoder import _prompt
    from lathe.bench.perplexity import as_tokenizers, heldout_texts, perplexity
    from lathe.models.generic import adapt, reference_model

    src = Path(lathe.__path__[0]) / "data" / "decoder-lm"
    models, notes = {"transformers fp32": adapt(reference_model(src))}, []
    models["torchao int8 (eager)"], _ = tao.quantized(src, "torchao-int8")
    try:
        models["torchao int4"], _ = tao.quantized(src, "torchao-int4")
    except tao.Unavailable as e:
        notes.append(f"torchao-int4: {e}")
    for rec in ("int8", "int4-rtn"):
        models[f"lathe {rec}"] = lathe.load(lathe.compress_checkpoint(src, rec, work / f"lm-{rec}"))
    tok = as_tokenizers(src)
    log("decoder perplexity ...")
    with torch.inference_mode():
        ppl = {n: perplexity(m, tok, heldout_texts(16), max_tokens=8192) for n, m in models.items()}
    x = _prompt(tok, 1, 128)

    def decode(m):  # prefill, then `gen` greedy steps on the model's own cache
        logits, cache = m(x, use_cache=True)
        nxt = logits[:, -1:].argmax(-1)
        for _ in range(gen):
            logits, cache = m(nxt, past_key_values=cache, use_cache=True)
            nxt = logits[:, -1:].argmax(-1)

    rows = []
    log(f"decoder prefill b1 s128: {rounds} rounds ...")
    pre = ratio_stats(rounds_ms({n: (lambda m=m: m(x)) for n, m in models.items()}, rounds), "transformers fp32")
    log(f"decoder prefill + {gen} tokens: {rounds} rounds ...")
    dec = ratio_stats(rounds_ms({n: (lambda m=m: decode(m)) for n, m in models.items()}, rounds), "transformers fp32")
    for shape, st in (("prefill b1 s128", pre), (f"prefill + {gen} tokens", dec)):
        rows += [{"model": "decoder-lm", "shape": shape, "backend": n, **st[n], "quality": f"ppl {ppl[n]:.3f}"}
                 for n in models]
    return rows, notes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--skip", default="", help="encoder,decoder")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--md")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from lathe.bench import torchao_backend as tao

    tao.import_torchao()
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as d:
        if "encoder" not in a.skip:
            r, n = encoder(Path(d), a.rounds, a.compile, log)
            rows, notes = rows + r, notes + n
        if "decoder" not in a.skip:
            r, n = decoder(Path(d), a.rounds, a.gen, log)
            rows, notes = rows + r, notes + [x for x in n if x not in notes]
    lines = [f"torch {torch.__version__}, torchao {tao.version()}, {torch.get_num_threads()} threads, "
             f"{a.rounds} interleaved rounds", "",
             "| model | shape | backend | p50 ms | speed-up vs fp32 (median, IQR) | quality |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['shape']} | {r['backend']} | {r['p50_ms']:.1f} | {r['speedup']:.2f}x "
              f"({r['q25']:.2f}-{r['q75']:.2f}) | {r['quality']} |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    out = "\n".join(lines)
    print(out)
    if a.md:
        from lathe.io import write_text
        write_text(a.md, out + "\n")  # temp file renamed into place


if __name__ == "__main__":
    main()
