"""Reports: a table on stdout, JSON (schema below), CSV, Markdown and PNG plots.

JSON schema (schema_version 1):
  {"schema_version": 1, "kind": "encoder", "created": str, "machine": {...bench.machine...},
   "config": {...}, "interrupted": bool,
   "results": [{"backend": str, "batch": int, "seq": int, "n": int, "min_ms", "mean_ms",
                "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "stdev_ms", "cv": float,
                "throughput_per_s": float, "speedup_vs_torch_fp32": float | null,
                "size_bytes": int, "peak_rss_mb": float}],
   "quality": {backend: {"min_cos": float, "mean_cos": float, "n_sentences": int}}}
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

SCHEMA_VERSION = 1
RESULT_KEYS = ("backend", "batch", "seq", "n", "min_ms", "mean_ms", "p50_ms", "p90_ms", "p95_ms",
               "p99_ms", "max_ms", "stdev_ms", "cv", "throughput_per_s")


def validate_schema(doc: dict) -> None:
    """Raises ValueError naming the first problem (used by tests and by `bench compare`)."""
    if not isinstance(doc, dict):
        raise ValueError(f"bench JSON must be an object, got {type(doc).__name__}")
    for k in ("schema_version", "machine", "results"):
        if k not in doc:
            raise ValueError(f"bench JSON lacks {k!r}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"bench JSON schema_version {doc['schema_version']} != {SCHEMA_VERSION}")
    if not isinstance(doc["results"], list):
        raise ValueError("bench JSON 'results' must be a list")
    for i, r in enumerate(doc["results"]):
        if not isinstance(r, dict):
            raise ValueError(f"bench JSON results[{i}] must be an object")
        for k in RESULT_KEYS:
            if k not in r:
                raise ValueError(f"bench JSON results[{i}] lacks {k!r}")
        for k in RESULT_KEYS[1:]:
            if isinstance(r[k], bool) or not isinstance(r[k], (int, float)):
                raise ValueError(f"bench JSON results[{i}].{k} must be a number, got {r[k]!r}")
    q = doc.get("quality", {})
    if not isinstance(q, dict) or not all(isinstance(v, dict) for v in q.values()):
        raise ValueError("bench JSON 'quality' must map each backend to an object")


def table(doc: dict) -> str:
    q = doc.get("quality", {})
    rows = [("backend", "batch", "seq", "p50 ms", "p90 ms", "cv", "speed-up", "min cos", "mean cos", "size MB")]
    for r in doc["results"]:
        qq = q.get(r["backend"], {})
        sp = r.get("speedup_vs_torch_fp32")
        rows.append((r["backend"], str(r["batch"]), str(r["seq"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                     f"{r['cv'] * 100:.1f}%", f"{sp:.2f}x" if sp else "-",
                     f"{qq['min_cos']:.4f}" if qq else "-", f"{qq['mean_cos']:.4f}" if qq else "-",
                     f"{r.get('size_bytes', 0) / 1e6:.1f}"))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    warn = [f"warning: {r['backend']} b{r['batch']} s{r['seq']} has CV {r['cv'] * 100:.1f}% (> 5%): noisy machine"
            for r in doc["results"] if r["cv"] > 0.05]
    skipped = [f"{k}: skipped: {why}" for k, why in doc.get("skipped", {}).items()]
    return "\n".join(lines + warn + skipped)


def markdown(doc: dict) -> str:
    m = doc["machine"]
    head = (f"# lathe bench\n\nMachine: {m['cpu']} ({m['cores']} cores, {m['threads']} threads, "
            f"ISA {', '.join(m['isa_flags'])}; lathe ISA {m['lathe_isa']}), GPU: {m['gpu']}. "
            f"Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".\n\n")
    q = doc.get("quality", {})
    rows = ["| backend | batch | seq | p50 ms | p90 ms | p99 ms | cv | speed-up vs torch fp32 | min cosine | size MB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        qq = q.get(r["backend"], {})
        sp = r.get("speedup_vs_torch_fp32")
        cos = f"{qq['min_cos']:.4f}" if qq else "-"
        rows.append(f"| {r['backend']} | {r['batch']} | {r['seq']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                    f"{r['p99_ms']:.2f} | {r['cv'] * 100:.1f}% | {f'{sp:.2f}x' if sp else '-'} | "
                    f"{cos} | {r.get('size_bytes', 0) / 1e6:.1f} |")
    note = "\n\nQuality: minimum cosine of mean-pooled sentence embeddings against torch fp32 over lathe's fixed set.\n"
    return head + "\n".join(rows) + note


def write_csv(doc: dict, path: Path):
    keys = list(RESULT_KEYS) + ["speedup_vs_torch_fp32", "size_bytes", "peak_rss_mb", "min_cos"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in doc["results"]:
            w.writerow(r | {"min_cos": doc.get("quality", {}).get(r["backend"], {}).get("min_cos")})


def plot(doc: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    backends = list(dict.fromkeys(r["backend"] for r in res))
    batches = sorted({r["batch"] for r in res})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        ys = [next((r["p50_ms"] for r in res if r["backend"] == b and r["batch"] == bt), 0) for bt in batches]
        xs = [j + i * width for j in range(len(batches))]
        ax1.bar(xs, ys, width, label=b)
    ax1.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(batches))])
    ax1.set_xticklabels([f"batch {b}" for b in batches])
    ax1.set_yscale("log")  # batch 1 and batch 8 differ by 10x: keep both readable
    for c in ax1.containers:
        ax1.bar_label(c, fmt="%.1f", fontsize=7, padding=2)
    ax1.set_ylabel("p50 latency (ms, log scale), lower is better")
    ax1.set_title(f"latency by batch (seq {res[0]['seq']})")
    ax1.legend(fontsize=8)
    q = doc.get("quality", {})
    for b in backends:
        pts = [(r["speedup_vs_torch_fp32"], q.get(b, {}).get("min_cos")) for r in res
               if r["backend"] == b and r.get("speedup_vs_torch_fp32")]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax2.scatter([p[0] for p in pts], [p[1] for p in pts], label=b, s=50)
            for r in res:
                if r["backend"] == b and r.get("speedup_vs_torch_fp32") and q.get(b):
                    ax2.annotate(f"b{r['batch']}", (r["speedup_vs_torch_fp32"], q[b]["min_cos"]),
                                 fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax2.set_xlabel("speed-up over torch fp32 (x)")
    ax2.set_ylabel("min cosine vs fp32")
    ax2.set_title("speed-up against quality")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"lathe bench: {doc['machine']['cpu']}, {doc['machine']['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_all(doc: dict, out_dir: Path) -> dict:
    """report.json, report.md, report.csv, report.png, each written atomically."""
    from lathe.io import atomic_file

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fn in (("report.json", lambda p: p.write_text(json.dumps(doc, indent=2))),
                     ("report.md", lambda p: p.write_text(markdown(doc))),
                     ("report.csv", lambda p: write_csv(doc, p)),
                     ("report.png", lambda p: plot(doc, p))):
        with atomic_file(out_dir / name) as tmp:
            fn(tmp)
        paths[name] = out_dir / name
    return paths


# Quality drops that count as a regression when --quality-threshold is not given: minimum
# cosine against fp32 falling by more than 0.005, perplexity rising by more than 1%.
COS_DROP = 0.005
PPL_RISE = 0.01


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_threshold(name: str, v) -> float:
    if not _finite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def compare(a: dict, b: dict, threshold: float = 0.10, quality_threshold: float | None = None) -> tuple[str, bool]:
    """Run b against run a. Returns (text, regressed). A regression: some p50 grew by more than
    `threshold`; a backend of a is missing from b; a figure of b is not finite; b has no
    results; quality fell (min cosine by more than quality_threshold, default 0.005, or
    perplexity rose by more than quality_threshold as a fraction, default 1%)."""
    validate_schema(a)
    validate_schema(b)
    threshold = check_threshold("threshold", threshold)
    cos_drop = COS_DROP if quality_threshold is None else check_threshold("quality threshold", quality_threshold)
    ppl_rise = PPL_RISE if quality_threshold is None else cos_drop
    key = lambda r: (r["backend"], r["batch"], r["seq"])  # noqa: E731
    old = {key(r): r for r in a["results"]}
    new = {key(r): r for r in b["results"]}
    lines, regressed = [], False

    def flag(line):
        nonlocal regressed
        regressed = True
        lines.append(line + " REGRESSION")

    if not b["results"]:
        flag("B has no results")
    for r in b["results"]:
        name = f"{r['backend']} b{r['batch']} s{r['seq']}"
        bad = [k for k in RESULT_KEYS[3:] if not _finite(r[k])]
        if bad:
            flag(f"{name}: {bad[0]} is {r[bad[0]]!r}, not a finite number")
            continue
        o = old.get(key(r))
        if o is None:
            lines.append(f"{name}: new ({r['p50_ms']:.2f} ms)")
            continue
        if not _finite(o["p50_ms"]) or o["p50_ms"] <= 0:
            flag(f"{name}: A's p50 is {o['p50_ms']!r}, nothing to compare against")
            continue
        ratio = r["p50_ms"] / o["p50_ms"]
        tag = "REGRESSION" if ratio > 1 + threshold else ("faster" if ratio < 1 - threshold else "same")
        regressed |= tag == "REGRESSION"
        lines.append(f"{name}: {o['p50_ms']:.2f} -> {r['p50_ms']:.2f} ms ({ratio:.2f}x time) {tag}")
    for k in old:
        if k not in new:
            flag(f"{k[0]} b{k[1]} s{k[2]}: in A, missing from B")
    qa, qb = a.get("quality", {}), b.get("quality", {})
    for backend, qo in qa.items():
        qn = qb.get(backend)
        if qn is None:
            if any(r["backend"] == backend for r in b["results"]):
                flag(f"{backend}: quality measured in A, missing from B")
            continue
        for metric, worse in (("min_cos", lambda o, n: o - n > cos_drop),
                              ("perplexity", lambda o, n: (n - o) > ppl_rise * abs(o))):
            if metric not in qo:
                continue
            o, n = qo[metric], qn.get(metric)
            if not _finite(n):
                flag(f"{backend}: {metric} {n!r} is not a finite number")
            elif _finite(o) and worse(o, n):
                flag(f"{backend}: {metric} {o:.4f} -> {n:.4f}")
            elif _finite(o):
                lines.append(f"{backend}: {metric} {o:.4f} -> {n:.4f} same")
    return "\n".join(lines), regressed
