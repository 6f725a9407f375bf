"""`lathe bench TARGET --device cuda`: a torch fp16 baseline and lathe side by side on one GPU.

Decoders (Llama): the plain-PyTorch Llama (lathe.bench.torch_llama) and lathe's adapter, both
with the static KV cache and the CUDA-graphed decode step (lathe.models.static_cache);
prefill ms, decode ms/token, tokens/s and peak memory, with held-out perplexity beside speed.
Encoders (BERT): transformers' BertModel in fp16 against lathe's model, with the cosine of the
sentence embeddings against fp32 beside speed. Timed with CUDA events after warm-up; p50/p90.

The same functions run on the CPU (perf_counter instead of events, the graph replaced by the
eager step) for the dry run of lathe.bench.gpu_e2e and its test."""
from __future__ import annotations

import time

import torch

from lathe.bench.stats import summarize
from lathe.errors import BadInput


def require_cuda(device) -> torch.device:
    """The CUDA device asked for, or a one-line BadInput (CLI exit 2): never a silent CPU run."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise BadInput(f"--device {device}: the GPU benchmark needs a cuda device")
    if not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA GPU found, this machine has no usable CUDA GPU "
                       "(torch.cuda.is_available() is False)")
    return dev


def timed(fn, device, warmup: int = 3, runs: int = 20) -> list[float]:
    """Per-call milliseconds after warm-up: CUDA events on a GPU, perf_counter on the CPU."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    if dev.type != "cuda":
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    torch.cuda.synchronize(dev)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(dev)
    return [s.elapsed_time(e) for s, e in ev]


def _stats(ms: list[float]) -> dict:
    s = summarize(ms)
    return {"p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"], "n": s["n"]}


def _reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev):
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


@torch.no_grad()
def decode_speed(model, device, batch: int = 1, context: int = 128, steps: int = 32,
                 graph: bool = True, vocab: int | None = None) -> dict:
    """Decode ms/token at `batch` rows with `context` tokens cached: the CUDA-graphed step
    replayed at successive positions (one timing a step)."""
    from lathe.models.static_cache import GraphedStep

    dev = torch.device(device)
    vocab = vocab or model.config["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(dev)
    model.setup_static_cache(batch, context + steps + 8)
    model.forward_static(ids, torch.arange(context, device=dev), start=0)
    step = GraphedStep(model, graph=graph)
    tok = ids[:, -1:].clone()
    pos = torch.tensor([context], device=dev)
    step(tok, pos)  # capture (GPU) / first call
    n = [0]

    def one():
        pos.fill_(context + n[0] % steps)
        step(tok, pos)
        n[0] += 1
    ms = timed(one, dev, warmup=3, runs=steps)
    st = _stats(ms)
    return {"batch": batch, "context": context, "decode_per_token": st,
            "decode_tokens_per_s": batch * 1e3 / st["p50_ms"], "cuda_graph": bool(graph and dev.type == "cuda")}


@torch.no_grad()
def prefill_speed(model, device, batch: int = 8, prompt_len: int = 512, runs: int = 10,
                  vocab: int | None = None) -> dict:
    dev = torch.device(device)
    vocab = vocab or model.config["vocab_size"]
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(dev)
    model.setup_static_cache(batch, prompt_len)
    pos = torch.arange(prompt_len, device=dev)
    st = _stats(timed(lambda: model.forward_static(ids, pos, start=0), dev, warmup=2, runs=runs))
    return {"batch": batch, "prompt_len": prompt_len, "prefill": st,
            "prefill_tokens_per_s": batch * prompt_len * 1e3 / st["p50_ms"]}


def perplexity_on(model, device, tok, n_files: int = 16, max_tokens: int = 8192) -> float:
    """Held-out perplexity of the shipped decoder's text split, the model run on `device`."""
    from lathe.bench.perplexity import heldout_texts, perplexity

    dev = torch.device(device)

    def run(ids, mask):
        return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).float().cpu()
    return perplexity(run, tok, heldout_texts(n_files), max_tokens=max_tokens)


def logits_cosine(model, ref_model, device, tok, n_files: int = 4, seq: int = 256) -> float:
    """Mean cosine of next-token logits (model on `device`) against ref_model (fp32, CPU)."""
    from lathe.bench.perplexity import heldout_texts

    dev = torch.device(device)
    ids = tok.encode("\n".join(heldout_texts(n_files))).ids[: 4 * seq]
    x = torch.tensor(ids[: (len(ids) // seq) * seq]).view(-1, seq)
    with torch.no_grad():
        a = model(x.to(dev)).float().cpu()
        b = ref_model(x).float()
    return float(torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1).mean())


def run_decoder(target, device="cuda", batch: int = 1, context: int = 128, steps: int = 32,
                prefill_batch: int = 8, prefill_len: int = 512, dtype=torch.float16, log=print) -> dict:
    """torch fp16 (plain PyTorch) and lathe (the target, and its source uncompressed), all
    CUDA-graphed, with held-out perplexity (a decoder with the shipped tokenizer only)."""
    import lathe
    from lathe.bench.machine import describe
    from lathe.bench.torch_llama import TorchLlama
    from lathe.source import open_source

    dev = require_cuda(device) if str(device).startswith("cuda") else torch.device(device)
    tgt = open_source(target)
    src = open_source(tgt.manifest["source"]["path"]) if tgt.is_compressed else tgt
    try:
        from lathe.bench.perplexity import as_tokenizers
        tok = as_tokenizers(src.path)
    except Exception:  # a random-weight model without a tokenizer: speed only
        tok = None
    name = tgt.manifest["recipe"]["name"] if tgt.is_compressed else "fp16"
    dt = dtype_name(dtype)
    models = [(f"torch {dt}", lambda: TorchLlama.load(src.path, dev, dtype)),
              (f"lathe {dt}", lambda: fused(lathe.load(src.path, dev, dtype)))]
    if tgt.is_compressed:
        models.append((f"lathe {name}", lambda: fused(lathe.load(tgt.path, dev, dtype))))
    rows = []
    for label, make in models:
        log(f"{label}: decode b{batch} ctx {context}, prefill {prefill_batch}x{prefill_len} ...")
        _reset_peak(dev)
        t0 = time.perf_counter()
        m = make()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        load_s = time.perf_counter() - t0
        row = {"backend": label, "load_s": load_s,
               **decode_speed(m, dev, batch, context, steps),
               **prefill_speed(m, dev, prefill_batch, prefill_len), "peak_mb": _peak_mb(dev)}
        if tok is not None:
            row["perplexity"] = perplexity_on(m, dev, tok)
        rows.append(row)
        del m
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]
    for r in rows:
        r["decode_speedup_vs_torch"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["prefill_speedup_vs_torch"] = base["prefill"]["p50_ms"] / r["prefill"]["p50_ms"]
    return {"kind": "gpu-decoder", "machine": describe(), "device": _device_name(dev),
            "config": {"target": str(tgt.path), "source": str(src.path), "batch": batch, "context": context,
                       "prefill": [prefill_batch, prefill_len], "dtype": str(dtype)},
            "results": rows}


def run_encoder(target, device="cuda", batch: int = 64, seq: int = 128, dtype=torch.float16,
                runs: int = 20, log=print) -> dict:
    """transformers BertModel in fp16 (plain PyTorch) against lathe's model (the target) at
    batch x seq, with the cosine of mean-pooled embeddings against fp32 BertModel."""
    import lathe
    from transformers import BertModel

    from lathe.bench.machine import describe
    from lathe.models.bert import mean_pool
    from lathe.source import open_source
    from lathe.models import tokenizer
    from lathe.text import eval_sentences

    dev = require_cuda(device) if str(device).startswith("cuda") else torch.device(device)
    tgt = open_source(target)
    src = open_source(tgt.manifest["source"]["path"]) if tgt.is_compressed else tgt
    sents = eval_sentences()
    x = {k: v.to(dev) for k, v in tokenizer(src.path)((sents * (batch // len(sents) + 1))[:batch], seq).items()}
    with torch.no_grad():
        ref = BertModel.from_pretrained(src.path).eval().to(dev)
        truth = mean_pool(ref(**x).last_hidden_state.float(), x["attention_mask"])
        del ref
    name = tgt.manifest["recipe"]["name"] if tgt.is_compressed else dtype_name(dtype)
    makers = [(f"torch {dtype_name(dtype)}", lambda: BertModel.from_pretrained(src.path, dtype=dtype).eval().to(dev),
               lambda m: m(**x).last_hidden_state),
              (f"lathe {name}", lambda: lathe.load(tgt.path, dev, dtype), lambda m: m(**x))]
    rows = []
    for label, make, call in makers:
        log(f"{label}: batch {batch} x {seq} ...")
        _reset_peak(dev)
        m = make()
        with torch.no_grad():
            emb = mean_pool(call(m).float(), x["attention_mask"])
            st = _stats(timed(lambda: call(m), dev, warmup=3, runs=runs))
        cos = torch.nn.functional.cosine_similarity(emb, truth, dim=-1)
        rows.append({"backend": label, "batch": batch, "seq": seq, "latency": st,
                     "sequences_per_s": batch * 1e3 / st["p50_ms"], "peak_mb": _peak_mb(dev),
                     "min_cosine_vs_fp32": float(cos.min()), "mean_cosine_vs_fp32": float(cos.mean())})
        del m
    for r in rows:
        r["speedup_vs_torch"] = rows[0]["latency"]["p50_ms"] / r["latency"]["p50_ms"]
    return {"kind": "gpu-encoder", "machine": describe(), "device": _device_name(dev),
            "config": {"target": str(tgt.path), "batch": batch, "seq": seq, "dtype": str(dtype)},
            "results": rows}


def dtype_name(dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def fused(model):
    """lathe's Llama with q/k/v in one GEMM (its fuse_qkv transform, exact), as the baseline
    has it (gpt-fast's wqkv): the comparison is then about kernels, not launch counts."""
    if "fuse_qkv" in getattr(model, "applied_transforms", ["fuse_qkv"]) or not len(model.model.layers):
        return model
    a = model.model.layers[0].self_attn
    parts = [getattr(a, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    # plain Linears, or quantized ones that can concatenate (W8A16 and FP8 cannot yet)
    if all(type(p) is torch.nn.Linear or hasattr(type(p), "concat") for p in parts):
        model.transform("fuse_qkv")
    return model


def _device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def table(doc: dict) -> str:
    if doc["kind"] == "gpu-encoder":
        lines = [f"{'backend':24} {'p50 ms':>8} {'p90 ms':>8} {'seq/s':>9} {'x torch':>12} {'min cos':>8} {'peak MB':>8}"]
        for r in doc["results"]:
            lines.append(f"{r['backend']:24} {r['latency']['p50_ms']:8.2f} {r['latency']['p90_ms']:8.2f} "
                         f"{r['sequences_per_s']:9.1f} {r['speedup_vs_torch']:11.2f}x "
                         f"{r['min_cosine_vs_fp32']:8.4f} {r['peak_mb'] or 0:8.0f}")
        return "\n".join(lines)
    lines = [f"{'backend':24} {'decode ms/tok p50/p90':>22} {'tok/s':>8} {'x torch':>7} "
             f"{'prefill ms p50':>15} {'x torch':>7} {'load s':>7} {'peak MB':>8} {'ppl':>7}"]
    for r in doc["results"]:
        d = r["decode_per_token"]
        lines.append(f"{r['backend']:24} {d['p50_ms']:10.3f}/{d['p90_ms']:<10.3f} {r['decode_tokens_per_s']:9.1f} "
                     f"{r['decode_speedup_vs_torch']:6.2f}x {r['prefill']['p50_ms']:15.2f} "
                     f"{r['prefill_speedup_vs_torch']:6.2f}x {r['load_s']:7.2f} {r['peak_mb'] or 0:8.0f} "
                     f"{r.get('perplexity', float('nan')):7.2f}")
    return "\n".join(lines)
