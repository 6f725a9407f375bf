"""Where a CNN's int8 time goes, layer by layer (`lathe bench conv-layers DIR`): lathe's conv chain
as its C++ clocks each layer (ConvChain.layer_times) beside onnxruntime's per-node profile of its
static QDQ int8 model (quantize_static, per-channel, as `lathe bench` builds it), paired in
execution order when both have one convolution per layer. Medians over --runs runs, one process,
lathe's runs first: compare layers within a column and the two columns' shapes, not one total
against another from a different moment (bench/results/efficientnet-lite0-cpu.md)."""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import torch


def lathe_layers(target, batch: int, runs: int) -> list[tuple[str, float]]:
    import lathe
    from lathe import images, vision
    from lathe.errors import BadInput
    from lathe.kernels import conv_chain
    from lathe.source import open_source

    m = lathe.load(target).eval()
    x = images.image_set(batch, vision.image_size(open_source(target)), seed=3)
    with torch.inference_mode():
        m(x)
    c = conv_chain._OWNED.get(m)
    if c is None:
        raise BadInput(f"{target}: its convolutions do not run as one lathe conv chain (not int8, or no adapter chain)")
    with torch.inference_mode():
        return c.layer_times(x, runs)


def ort_layers(target, batch: int, runs: int, work: Path) -> list[tuple[str, str, float]]:
    """[(node name, op type, median seconds)] of onnxruntime's static int8 model, in run order."""
    from lathe import images, vision
    from lathe.bench.vision import backends
    from lathe.export.validate import ort_session
    from lathe.source import open_source

    backends(target, work, ("ort-int8",), log=lambda *a: None)
    s = ort_session(work / "model-ort-qdq.onnx", profile_prefix=str(work / "ort-profile"))
    src = open_source(target)
    src = open_source(src.manifest["source"]["path"]) if src.is_compressed else src
    x = images.image_set(batch, vision.image_size(src), seed=3).numpy()
    for _ in range(2 + runs):
        s.run(None, {"pixel_values": x})
    events = json.loads(Path(s.end_profiling()).read_text())
    per = collections.OrderedDict()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per.setdefault(e["name"][:-len("_kernel_time")], (e["args"].get("op_name", "?"), []))[1].append(e["dur"])
    return [(n, op, statistics.median(d[2:] or d) / 1e6) for n, (op, d) in per.items()]


def run(target, batch: int = 1, runs: int = 20) -> dict:
    with tempfile.TemporaryDirectory(prefix="lathe-conv-layers-") as tmp:
        ours = lathe_layers(target, batch, runs)
        theirs = ort_layers(target, batch, runs, Path(tmp))
    return {"target": str(target), "batch": batch, "threads": torch.get_num_threads(), "runs": runs,
            "lathe": [{"layer": n, "s": t} for n, t in ours],
            "onnxruntime": [{"node": n, "op": op, "s": t} for n, op, t in theirs]}


def table(doc: dict) -> str:
    ours = doc["lathe"]
    convs = [r for r in doc["onnxruntime"] if r["op"] in ("QLinearConv", "ConvInteger", "Conv")]
    paired = len(convs) == len(ours) - 1  # lathe's first row is the images' quantization
    lines = [f"batch {doc['batch']}, {doc['threads']} threads, medians of {doc['runs']} runs (us)",
             f"{'lathe layer':32} {'lathe':>9} {'onnxruntime':>12} {'ratio':>6}"]
    for i, r in enumerate(ours):
        o = convs[i - 1]["s"] if paired and i > 0 else None
        lines.append(f"{r['layer']:32} {r['s'] * 1e6:9.1f} " + (f"{o * 1e6:12.1f} {r['s'] / o:6.2f}" if o else f"{'':12} {'':6}"))
    other = sum(r["s"] for r in doc["onnxruntime"]) - sum(r["s"] for r in convs)
    lines.append(f"{'total':32} {sum(r['s'] for r in ours) * 1e6:9.1f} {sum(r['s'] for r in convs) * 1e6:12.1f}"
                 f"   (+ {other * 1e6:.1f} us in onnxruntime's other nodes)")
    if not paired:
        lines.append(f"(onnxruntime has {len(convs)} convolution nodes for lathe's {len(ours) - 1} layers: not paired)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lathe bench conv-layers", description=__doc__.split("\n")[0])
    ap.add_argument("target", help="a lathe int8 CNN directory (e.g. from `lathe compress efficientnet-lite0`)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from lathe.source import resolve
    doc = run(str(resolve(a.target)), a.batch, a.runs)
    print(table(doc))
    if a.json:
        from lathe.io import write_text
        write_text(Path(a.json), json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
