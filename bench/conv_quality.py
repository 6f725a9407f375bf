"""The accuracy ablation of CNN int8 (`python -m lathe.bench.conv_quality [CONFIG ...]`):
each step of lathe.compress.conv_quant switched on or off, on lathe's real int8 kernels, with
onnxruntime's static QDQ int8 (quantize_static, per-channel, the same calibration images) and
the model run in bf16 as references. Quality: top-1 agreement (all images, and split by the
fp32 model's confidence p >= 0.5 / < 0.5) and logits cosine against fp32 on lathe's image set."""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

OFF = dict(equalize=False, gptq=False, bias_correction=False, float_first=False, observer="minmax")
STEPS = dict(equalize=True, gptq=True, bias_correction=True, float_first=True, observer="minmax")
CONFIGS = {
    "plain": OFF,  # the recipe before these steps: RTN weights, min/max ranges
    "plain+float_first": OFF | dict(float_first=True),
    "plain+equalize": OFF | dict(equalize=True),
    "plain+bias_correction": OFF | dict(bias_correction=True),
    "plain+gptq": OFF | dict(gptq=True),
    "steps": STEPS,  # the four steps, min/max ranges
    "steps-equalize": STEPS | dict(equalize=False),
    "steps-gptq": STEPS | dict(gptq=False),
    "steps-bias_correction": STEPS | dict(bias_correction=False),
    "steps-float_first": STEPS | dict(float_first=False),
    "steps+percentile": STEPS | dict(observer="percentile"),
    "default": STEPS | dict(observer="mse"),  # what `lathe compress ... --recipe int8` does
}
REFERENCES = ("ort-int8", "bf16")


def _quality(ref, out):
    from lathe import vision

    r = vision.quality(ref, out)
    sure = ref.softmax(-1).amax(-1) >= 0.5
    same = ref.argmax(-1) == out.argmax(-1)
    r["top1_agreement_unsure"] = float(same[~sure].float().mean()) if (~sure).any() else None
    r["unsure_images"] = int((~sure).sum())
    return r


def _ort_int8(calib_images, x, work: Path):
    import lathe
    from lathe.bench.vision import _ort_static, _session
    from lathe.export.vision import export_fp32

    work.mkdir(parents=True, exist_ok=True)
    o32 = export_fp32(lathe.load("efficientnet-lite0"), work / "fp32.onnx", x.shape[-1])
    s = _session(_ort_static(o32, work / "qdq.onnx", calib_images))
    return torch.cat([torch.from_numpy(s.run(None, {"pixel_values": x[i:i + 32].numpy()})[0])
                      for i in range(0, len(x), 32)])


def run(names, target="efficientnet-lite0", n_images: int = 128, n_calib: int = 64, work="lathe-conv-quality",
        log=print) -> dict:
    import lathe
    from lathe import images, vision
    from lathe.compress.conv_quant import quantize_convnet

    fp = lathe.load(target).eval()
    size = int(getattr(fp, "config", {}).get("image_size", 224))
    x = images.image_set(n_images, size)
    calib_x = images.image_set(n_calib, size, seed=1)  # what `lathe compress` calibrates on
    calib = images.batches(calib_x, 16)
    ref = vision.logits(fp, x)
    rows = []
    for name in names:
        t = time.perf_counter()
        rep = None
        if name == "ort-int8":
            out = _ort_int8(calib_x, x, Path(work))
        elif name == "bf16":
            m = copy.deepcopy(fp).to(torch.bfloat16)
            out = vision.logits(lambda b: m(b.to(torch.bfloat16)).float(), x)
        else:
            kw = dict(CONFIGS[name])
            m = copy.deepcopy(fp)
            rep = quantize_convnet(m, calib, kw.pop("observer"), **kw)
            out = vision.logits(m, x)
        row = {"config": name, **_quality(ref, out), "seconds": round(time.perf_counter() - t, 1)}
        if rep is not None:
            row["equalize"] = rep.get("equalize")
        rows.append(row)
        log(json.dumps(row))
    return {"target": target, "images": n_images, "calibration_images": n_calib, "rows": rows}


def table(doc) -> str:
    lines = ["| config | top-1 agreement | p >= 0.5 | p < 0.5 | logits cosine (mean) | cosine (min) |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['config']} | {r['top1_agreement']:.3f} | {r['top1_agreement_confident']:.3f} | "
                     f"{r['top1_agreement_unsure']:.3f} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lathe.bench.conv_quality", description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", default=["plain", "default", "ort-int8", "bf16"],
                    help=f"any of {', '.join(list(CONFIGS) + list(REFERENCES))}")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    doc = run(a.configs, n_images=a.images)
    print(table(doc))
    if a.json:
        from lathe.io import write_text
        write_text(Path(a.json), json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
