"""ONNX export with torch.onnx.export(dynamo=True), dynamic batch and sequence axes, lathe's
op lowerings, and validation against PyTorch on onnxruntime every time.

Targets: `onnxruntime` (int8 through DynamicQuantizeLinear/MatMulInteger, which onnxruntime
fuses, or lathe's exact per-token math; int4 as MatMulNBits) and `tensorrt` (symmetric static
QDQ, which TensorRT accepts, with activation scales calibrated here on lathe's calibration
scales recorded at compress time, or calibrated here on lathe's calibration texts, see
static_act_scales; int4 as blocked INT4 DequantizeLinear). Per format, see
lathe.export.lowerings (one file a format); decoders: lathe.export.decoder; writing
(external data, onnxslim): lathe.export.save."""
from __future__ import annotations

import io
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch

from lathe.errors import BadInput


def _example_inputs(model_dir, batch: int = 2, seq: int = 16):
    """Sizes above 1 on the dynamic axes: torch.export would bake in a size of 0 or 1."""
    from lathe.models import tokenizer

    tok = tokenizer(model_dir)
    return tok(["lathe exports a model to onnx"] * batch, seq_len=seq)


def calibrate_act_scales(model, model_dir, texts=None, batch_size: int = 16,
                         max_act_error: float = 0.08, error_texts: int = 32, method: str = "minmax",
                         recorded: dict | None = None) -> dict:
    """Static per-tensor activation scales for the tensorrt target: {"<module>.weight": scale}.

    Runs the lathe model on calibration text (lathe.text.calibration_texts unless `texts`)
    with a pre-hook on every QLinearW8A8 that records max |x * smooth| over the real
    (non-padding) tokens; scale = amax / 127 (symmetric, zero point 0).

    A per-tensor static scale cannot represent some activations: BERT's FFN down-projection
    inputs carry one channel ~8x larger than the rest on a few tokens, which per-token dynamic
    quantization absorbs and a per-tensor scale does not (MiniLM: 0.88 cosine with every
    module quantized). A second pass measures each module's relative output error
    ||(Q(x) - x) W^T|| / ||x W^T|| on the first `error_texts` texts; a module above
    `max_act_error` gets scale None: the lowering keeps its activations in floating point
    (weight-only int8 DQ, no activation Q/DQ). max_act_error=float("inf") quantizes all.
    method: how amax is chosen, minmax (max |x|) or a histogram observer that may clip:
    percentile, mse, entropy (lathe.compress.calibration.make_observer). recorded: {module:
    scale} for every module (what compress recorded, see recorded_act_scales): the amax pass is
    skipped and only the error pass runs."""
    from lathe.compress.calibration import make_observer, real_tokens
    from lathe.compress.formats import quantized_modules
    from lathe.models import tokenizer
    from lathe.text import batches, calibration_texts

    mods = {n: m for n, m in quantized_modules(model) if m.format.act_int8}
    if not mods:
        return {}
    texts = list(texts or calibration_texts())
    if not texts:
        raise BadInput("calibration needs at least one text")
    tok = tokenizer(model_dir)
    obs = None if method == "minmax" else {n: make_observer(method, name=n) for n in mods}
    amax = dict.fromkeys(mods, 0.0)
    if recorded is not None:
        amax = {n: recorded[n] * 127.0 for n in mods}
    err = {n: [0.0, 0.0] for n in mods}
    state = {}

    def hook(name):
        def pre(mod, args):
            x = args[0].detach().float()
            if mod.smooth is not None:
                x = x * mod.smooth
            x = real_tokens(x, state.get("mask"))
            if not x.numel():
                return
            if state["pass"] == 0:
                if obs is None:
                    amax[name] = max(amax[name], float(x.abs().max()))
                else:
                    obs[name].update(x, name)
                return
            s = amax[name] / 127.0 if amax[name] > 0 else 1.0
            xq = torch.clamp(torch.round(x / s), -128, 127) * s
            w = (mod.weight.float() * mod.weight_scale[:, None]).t()
            err[name][0] += float(((xq - x) @ w).pow(2).sum())
            err[name][1] += float((x @ w).pow(2).sum())
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        with torch.inference_mode():
            for p, subset in ((0, texts if recorded is None else []),
                              (1, texts[:error_texts] if max_act_error != float("inf") else [])):
                state["pass"] = p
                if p == 1 and obs is not None:  # the observers' clip, before the error pass
                    amax.update({n: float(o.amax()) for n, o in obs.items() if o.batches})
                for b in batches(tok, subset, batch_size):
                    state["mask"] = b["attention_mask"]
                    model(**b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, a in amax.items():
        e, ref = err[n]
        rel = (e / ref) ** 0.5 if ref > 0 else 0.0
        out[f"{n}.weight"] = None if rel > max_act_error else (a / 127.0 if a > 0 else 1.0)
    return out


def recorded_act_scales(manifest: dict | None, model, method: str = "minmax") -> tuple[dict | None, str]:
    """The static activation scales compress recorded ({module: scale}, from the last step
    whose report holds act_scales, observed with `method`), mapped to `model`'s int8 modules,
    or (None, why not). A module fused after calibration (BERT's query/key/value into qkv)
    takes its recorded siblings' scale when they agree (they share one input)."""
    from lathe.compress.formats import quantized_modules

    steps = ((manifest or {}).get("report") or {}).get("steps") or []
    rec = next((r for r in reversed(steps) if isinstance(r, dict) and r.get("act_scales")), None)
    if rec is None:
        return None, "the checkpoint records no activation scales"
    if (rec.get("act_observer") or "minmax") != method:
        return None, f"the checkpoint's activation scales were observed with {rec.get('act_observer')}, not {method}"
    scales = rec["act_scales"]
    names = {n for n, _ in model.named_modules()}
    out = {}
    for n, m in quantized_modules(model):
        if not m.format.act_int8:
            continue
        if n in scales:
            out[n] = float(scales[n])
            continue
        parent = n.rpartition(".")[0]
        sib = {float(v) for k, v in scales.items() if k.rpartition(".")[0] == parent and k not in names}
        if len(sib) != 1:
            return None, f"the checkpoint records no activation scale for {n}"
        out[n] = sib.pop()
    return out, ""


def static_act_scales(model, source, calib=None, method: str = "minmax") -> dict:
    """The tensorrt target's static activation scales (calibrate_act_scales' result): from the
    scales compress recorded when it has them for every module (only the error pass that picks
    the float modules runs), else calibrated here, with a note saying why. Texts given in
    `calib` are always calibrated on."""
    import sys

    recorded, why = (None, "calibration texts were given") if calib else \
        recorded_act_scales(source.manifest, model, method)
    if recorded is None and source.is_compressed:
        print(f"note: calibrating static activation scales: {why}", file=sys.stderr)
    return calibrate_act_scales(model, source.path, calib, method=method, recorded=recorded)


# Known-harmless exporter noise: torch's pytree deprecation inside torch.export, the note that
# two inputs share the batch/seq axes (lathe declares them so), the skipped torchvision ops.
_EXPORTER_NOISE = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
                   (UserWarning, r"# The axis name: .* will not be used"))


@contextmanager
def _quiet_exporter():
    import logging
    import warnings

    reg = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg.level
    reg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category, message in _EXPORTER_NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        reg.setLevel(level)


def export_model(model, example: dict, out: Path, target: str = "onnxruntime", opset: int = 18,
                 act_scales: dict | None = None, int8_mode: str = "fused", exact: set | None = None,
                 accuracy_level: int = 4, external_data: bool | None = None, dynamic: dict | None = None,
                 output_names=("last_hidden_state",), input_names=None):
    """act_scales: static activation scales for target tensorrt (calibrate_act_scales).
    exact: int8 modules (weight buffer names) kept on the exact per-token lowering in int8_mode
    "hybrid". dynamic: torch.export dynamic shapes per input (default: batch and seq on axes 0
    and 1 of every input). external_data: None = only past the 2 GB protobuf limit."""
    from torch.export import Dim

    from lathe.export.lowerings import Context, translation_table
    from lathe.export.lowerings.common import Buffers
    from lathe.export.save import save_ir

    names = list(input_names or example)
    if dynamic is None:
        batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=512)
        dynamic = {n: {0: batch, 1: seq} for n in names}
    table = translation_table(Context(target, opset, int8_mode, accuracy_level, act_scales,
                                      frozenset(exact or ()), zero_point_table(model) if int8_mode == "fused" else None,
                                      Buffers(model)))
    with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
        # The exporter is chatty on stdout; lathe prints its own summary.
        with redirect_stdout(io.StringIO()):
            prog = torch.onnx.export(
                model, (), kwargs=dict(example), dynamo=True, opset_version=opset,
                input_names=names, output_names=list(output_names), dynamic_shapes=dynamic,
                custom_translation_table=table, optimize=True, verbose=False)
    prog.model.graph.sort()  # the exporter's optimizer can leave a node before its input's producer
    if target == "onnxruntime":
        from lathe.export.ort_graph import keep_layernorm_unfused
        keep_layernorm_unfused(prog.model)
    return save_ir(prog.model, Path(out), external_data)


def zero_point_table(model) -> dict:
    """{int8 module's weight name: J} for the fused lowering (lowerings.w8a8.zero_point_rows)."""
    from lathe.compress.formats import quantized_modules
    from lathe.export.lowerings.w8a8 import zero_point_rows

    return {f"{n}.weight": zero_point_rows(m.weight) for n, m in quantized_modules(model) if m.format.act_int8}


# Compared on their PyTorch reference: the graph computes the format's exact math.
REFERENCE_OPS = ("linear_w4a16",)


def precision_of(model, target: str, int8_mode: str, accuracy_level: int) -> str:
    """The validation tolerance (lathe.export.validate.TOLERANCE) for the loosest module kind."""
    from lathe.compress.formats import quantized_modules

    ranked = [m.format.precision(target, int8_mode, accuracy_level) for _, m in quantized_modules(model)]
    return min(ranked)[1] if ranked else "fp32"


def fast_exact_modules(model, source, calib=None) -> set:
    """int8 modules that int8_mode "hybrid" keeps on the exact per-token lowering: those whose
    activations one per-tensor scale represents badly (static_act_scales gives them None; in
    MiniLM the FFN down-projections of layers 0-3)."""
    return {k for k, v in static_act_scales(model, source, calib).items() if v is None}


# The newest opset lathe's lowerings are checked with (onnxruntime validates the export).
MAX_OPSET = 23
# The default opset of an encoder's fused int8 export: opset 21's blocked QuantizeLinear
# quantizes each row in place (fewer nodes; see lathe.export.lowerings.w8a8).
FUSED_OPSET = 21


def export_onnx(src, out, target: str = "onnxruntime", opset: int | None = None, validate: bool = True,
                batch: int = 2, seq: int = 16, calib=None, int8_mode: str = "fused",
                accuracy_level: int = 4, external_data: bool | None = None, slim: bool = False,
                calib_method: str = "minmax", force: bool = False):
    """Export checkpoint `src` (HF or lathe compressed) to `out`; returns (path, report).

    target "tensorrt": int8 linears become symmetric static QDQ; their activation scales are
    calibrated on `calib` (a list of texts; default lathe.text.calibration_texts()). Modules
    compressed with per-token asymmetric activations are exported symmetric (TensorRT accepts
    zero point 0 only), so the graph is validated with the looser "int8-static" tolerance.
    target "onnxruntime", int8_mode "fused" (default): lathe's per-token math in onnxruntime's
    fused int8 GEMM (lathe's quality, about 0.85x the speed of onnxruntime's own int8); "fast":
    per-tensor activations fused into DynamicQuantizeMatMul (lower quality); "hybrid": fast with
    the outlier modules (calibrated) per token; "exact": lathe's per-token math in standard ONNX
    ops only (any runtime; slower on onnxruntime). See lathe.export.lowerings.w8a8. accuracy_level: MatMulNBits'
    (int4 on onnxruntime; 4 = int8 activations, 0 = fp32). opset: default 18 (21 for an
    encoder's fused int8 export to onnxruntime: rows quantized in place), raised to what the
    modules need (21 for blocked int4/int8 DequantizeLinear, 19 for FP8). Llama decoders
    export with their KV cache (lathe.export.decoder). external_data: None = automatic past
    2 GB. slim: simplify with onnxslim, then validate. calib_method: the tensorrt target's
    activation amax (minmax, percentile, mse, entropy; see static_act_scales). The output is
    checked and locked first (lathe.io.claim); force replaces a file lathe did not write."""
    from lathe.export.lowerings import INT8_MODES, TARGETS
    from lathe.io import claim
    from lathe.source import open_source

    if opset is not None and opset < 18:
        raise BadInput(f"opset {opset} is too old: lathe exports opset 18 or newer")
    if target not in TARGETS:
        raise BadInput(f"unknown export target {target!r}: expected one of {', '.join(TARGETS)}")
    if int8_mode not in INT8_MODES:
        raise BadInput(f"unknown int8 mode {int8_mode!r}: expected one of {', '.join(INT8_MODES)}")
    from lathe.compress.calibration import METHODS
    if calib_method not in METHODS:
        raise BadInput(f"unknown calibration method {calib_method!r}: expected one of {', '.join(METHODS)}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise BadInput(f"accuracy_level must be 0-4 (MatMulNBits), got {accuracy_level}")
    if slim:
        try:
            import onnxslim  # noqa: F401
        except ImportError:
            raise BadInput("--slim needs the onnxslim package: pip install onnxslim") from None
    if opset is not None and opset > MAX_OPSET:
        raise BadInput(f"opset {opset} is newer than lathe exports (18 to {MAX_OPSET})")
    source = open_source(src)
    from lathe.export.folder import is_folder_target, write_folder
    args = (target, opset, validate, batch, seq, calib, int8_mode, accuracy_level, external_data, slim,
            calib_method)
    if is_folder_target(out):  # an Optimum-style folder: model.onnx, config.json, tokenizer
        with claim(out, "onnx-folder", [source.path], force, is_dir=True) as out:
            return write_folder(source, out, lambda p: _export(source, p, *args))
    with claim(out, "onnx", [source.path], force, is_dir=False) as out:
        return _export(source, out, *args)


def _export(source, out, target, opset, validate, batch, seq, calib, int8_mode, accuracy_level,
            external_data, slim, calib_method):
    from lathe.compress.checkpoint import load
    from lathe.compress.formats import quantized_modules
    from lathe.export.lowerings import needs_opset
    from lathe.export.validate import validate_onnx

    model = load(source.path)
    need = needs_opset(model, target)
    if opset is not None and opset < need:
        raise BadInput(f"opset {opset} is too old for this model's quantized modules: it needs {need}")
    asked, opset = opset, max(opset or 18, need)
    if getattr(model, "lathe_generic", False):  # any other transformers model
        from lathe.export.generic import export_generic
        return export_generic(model, source, out, target, opset, validate, int8_mode, accuracy_level,
                              external_data, slim)
    from lathe.models.base import adapter_of

    if adapter_of(model).is_decoder:
        from lathe.export.decoder import export_decoder
        return export_decoder(model, source, out, target, opset, validate, accuracy_level,
                              external_data, slim)
    if asked is None and target == "onnxruntime" and int8_mode == "fused" and \
            any(m.format.act_int8 for _, m in quantized_modules(model)):
        opset = max(opset, FUSED_OPSET)
    example = _example_inputs(source.path, batch, seq)
    scales = static_act_scales(model, source, calib, calib_method) if target == "tensorrt" else None
    exact = (fast_exact_modules(model, source, calib)
             if target == "onnxruntime" and int8_mode == "hybrid" else None)
    export_model(model, example, out, target, opset, scales, int8_mode, exact, accuracy_level, external_data)
    if slim:
        from lathe.export.save import slim as slim_file
        slim_file(out)
    precision = precision_of(model, target, int8_mode, accuracy_level) if source.is_compressed else "fp32"
    report = (validate_onnx(out, model, source.path, quantized=source.is_compressed, precision=precision,
                            reference_ops=REFERENCE_OPS) if validate else None)
    return out, report
