"""`lathe bench efficientnet-lite0 ...` (any CNN checkpoint): torch fp32 (channels_last),
onnxruntime fp32, onnxruntime static QDQ int8 (quantize_static, per-channel, calibrated on
lathe's calibration images) and lathe int8, timed interleaved (one call of each backend per
round, so a shared machine's noise hits all alike), with images/s, p50/p90, size on disk and
top-1 agreement / logits cosine against torch fp32 on lathe's image set."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lathe.errors import BadInput


def _ort_static(fp32_onnx: Path, out: Path, calib: torch.Tensor) -> Path:
    import logging

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    from lathe.io import atomic_file

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"pixel_values": calib[i:i + 8].numpy()} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)
    with atomic_file(out) as tmp:
        quantize_static(str(fp32_onnx), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _session(path):
    """onnxruntime's CPU session, lathe's one builder (threads that do not spin-wait)."""
    from lathe.export.validate import ort_session

    return ort_session(path)


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("*.safetensors"))


RANDOM = ("resnet-18", "resnet-50")


def random_model(name: str, work: Path) -> Path:
    """ResNet-18/50 from transformers' ResNetConfig with random weights, as a lathe checkpoint."""
    from transformers import ResNetConfig

    from lathe.models.resnet import random_checkpoint

    cfg = ResNetConfig() if name == "resnet-50" else ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2],
                                                                  hidden_sizes=[64, 128, 256, 512])
    out = Path(work) / name
    if not (out / "config.json").is_file():
        random_checkpoint(cfg.to_dict() | {"num_labels": 1000}, out)
    return out


def backends(target, work: Path, which, log=print) -> tuple[dict, object]:
    """name -> (callable(images) -> logits, size bytes); and the fp32 source."""
    import lathe
    from lathe import images, vision
    from lathe.export.vision import export_fp32
    from lathe.source import open_source

    if str(target) in RANDOM:  # a transformers config with random weights (speed, coverage)
        target = random_model(str(target), work)
    tgt = open_source(target)
    src = open_source(tgt.manifest["source"]["path"]) if tgt.is_compressed else tgt
    if not vision.benchable(src):
        raise BadInput(f"{target} is not an image model (model_type {src.model_type!r})")
    size = vision.image_size(src)
    work.mkdir(parents=True, exist_ok=True)
    if tgt.is_compressed:
        q_dir = tgt.path
    else:
        q_dir = work / "lathe-int8"
        if "lathe" in which:
            log(f"compressing {src.path} to int8 ...")
            lathe.compress_checkpoint(src.path, "int8", q_dir)
    out = {}
    fp32 = lathe.load(src.path).to(memory_format=torch.channels_last)
    if "torch" in which:
        out["torch fp32 (channels_last)"] = (lambda x: fp32(x.contiguous(memory_format=torch.channels_last)),
                                            _size(src.path))
    if "onnxruntime" in which or "ort-int8" in which:
        if vision.is_vision(src):
            onnx32 = export_fp32(lathe.load(src.path), work / "model-fp32.onnx", size)
        else:  # a transformers classifier on the generic path: lathe's generic export
            from lathe.export.onnx import export_onnx
            onnx32 = export_onnx(src.path, work / "model-fp32.onnx")[0]
        if "onnxruntime" in which:
            s = _session(onnx32)
            out["onnxruntime fp32"] = (lambda x, s=s: torch.from_numpy(s.run(None, {"pixel_values": x.numpy()})[0]),
                                       _size(onnx32))
        if "ort-int8" in which:
            q = _ort_static(onnx32, work / "model-ort-qdq.onnx", images.image_set(64, size, seed=1))
            s = _session(q)
            out["onnxruntime int8 (static QDQ)"] = (
                lambda x, s=s: torch.from_numpy(s.run(None, {"pixel_values": x.numpy()})[0]), _size(q))
    if "lathe" in which:
        m = lathe.load(q_dir)
        out["lathe int8"] = (m, _size(q_dir))
    return out, src


def run(target, work: Path, which=("torch", "onnxruntime", "ort-int8", "lathe"), batches=(1, 32),
        rounds: int = 10, warmup: int = 2, n_quality: int = 128, log=print) -> dict:
    from lathe import images, vision
    from lathe.bench.machine import describe
    from lathe.bench.stats import summarize

    bk, src = backends(target, Path(work), which, log)
    size = vision.image_size(src)
    doc = {"target": str(target), "machine": describe(), "threads": torch.get_num_threads(),
           "note": "interleaved rounds on a shared machine (8 helpers on 2 vCPUs): compare ratios, "
                   "not absolute times", "results": []}
    x_eval = images.image_set(n_quality, size)
    log(f"quality on {n_quality} images ...")
    with torch.inference_mode():
        logits = {n: torch.cat([f(x_eval[i:i + 32]) for i in range(0, n_quality, 32)]) for n, (f, _) in bk.items()}
    ref_name = next(iter(bk))
    quality = {n: vision.quality(logits[ref_name], v) for n, v in logits.items()}
    for B in batches:
        x = images.image_set(B, size, seed=3)
        times = {n: [] for n in bk}
        with torch.inference_mode():
            for _ in range(warmup):
                for f, _ in bk.values():
                    f(x)
            for _ in range(rounds):
                for n, (f, _) in bk.items():
                    t0 = time.perf_counter()
                    f(x)
                    times[n].append((time.perf_counter() - t0) * 1e3)
        for n in bk:
            st = summarize(times[n])
            ratios = {o: statistics.median(a / b for a, b in zip(times[o], times[n])) for o in bk if o != n}
            doc["results"].append({"backend": n, "batch": B, "p50_ms": st["p50_ms"], "p90_ms": st["p90_ms"],
                                   "images_per_s": B * 1e3 / st["p50_ms"], "size_bytes": bk[n][1],
                                   "speedup_vs": ratios, "quality_vs_torch_fp32": quality[n],
                                   "rounds": rounds})
        log(table(doc, B))
    return doc


def table(doc: dict, batch=None) -> str:
    rows = [r for r in doc["results"] if batch is None or r["batch"] == batch]
    lines = [f"{'backend':32} {'batch':>5} {'img/s':>8} {'p50 ms':>9} {'p90 ms':>9} {'MiB':>6} "
             f"{'x torch':>8} {'x ort-int8':>10} {'top-1 agr':>9} {'cos':>7}"]
    for r in rows:
        sv = r["speedup_vs"]
        xt = sv.get("torch fp32 (channels_last)", 1.0)
        xo = sv.get("onnxruntime int8 (static QDQ)", 1.0)
        q = r["quality_vs_torch_fp32"]
        lines.append(f"{r['backend']:32} {r['batch']:5d} {r['images_per_s']:8.1f} {r['p50_ms']:9.1f} "
                     f"{r['p90_ms']:9.1f} {r['size_bytes'] / 2**20:6.1f} {xt:8.2f} {xo:10.2f} "
                     f"{q['top1_agreement']:9.3f} {q['cosine_mean']:7.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lathe bench TARGET (image model)", description=__doc__.split("\n")[0])
    ap.add_argument("target")
    ap.add_argument("--backend", default="torch,onnxruntime,ort-int8,lathe")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quality-images", type=int, default=128)
    ap.add_argument("--out", default="lathe-bench-out")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    doc = run(a.target, Path(a.out), tuple(a.backend.split(",")), [int(b) for b in a.batch.split(",")],
              a.rounds, n_quality=a.quality_images)
    print(table(doc))
    from lathe.io import atomic_file
    for path, text in ((a.json, json.dumps(doc, indent=2)), (a.md, "```\n" + table(doc) + "\n```\n")):
        if path:
            with atomic_file(Path(path)) as t:
                t.write_text(text)
    return 0


def paired(a_dir, b_dir, batch: int = 32, rounds: int = 5, n_quality: int = 64) -> dict:
    """Latency ratio a/b (> 1: b faster) of two lathe CNN checkpoints timed alternately, and
    each one's quality against the fp32 source of a (e.g. unpruned int8 vs pruned int8)."""
    import lathe
    from lathe import images, vision
    from lathe.source import open_source

    A, B = open_source(a_dir), open_source(b_dir)
    src = open_source(A.manifest["source"]["path"]) if A.is_compressed else A
    a, b, ref = lathe.load(A.path), lathe.load(B.path), lathe.load(src.path)
    x = images.image_set(batch, vision.image_size(src), seed=3)
    ta, tb = [], []
    with torch.inference_mode():
        a(x), b(x)
        for _ in range(rounds):
            t0 = time.perf_counter()
            a(x)
            t1 = time.perf_counter()
            b(x)
            ta.append(t1 - t0)
            tb.append(time.perf_counter() - t1)
    xq = images.image_set(n_quality, vision.image_size(src))
    r = vision.logits(ref, xq)
    return {"a": str(a_dir), "b": str(b_dir), "batch": batch, "rounds": rounds,
            "a_p50_ms": 1e3 * statistics.median(ta), "b_p50_ms": 1e3 * statistics.median(tb),
            "speedup_b_over_a": statistics.median(x_ / y for x_, y in zip(ta, tb)),
            "quality_a": vision.quality(r, vision.logits(a, xq)), "quality_b": vision.quality(r, vision.logits(b, xq))}
