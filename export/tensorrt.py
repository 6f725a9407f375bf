"""TensorRT engines from lathe's ONNX exports. Gated: the tensorrt package comes from NVIDIA's
own index (pip install tensorrt --extra-index-url https://pypi.nvidia.com) and needs an NVIDIA
GPU; without either, every entry point raises BadInput with a one-line message.

- build_engine(): ONNX -> serialized engine, written atomically. The network is strongly
  typed whenever the installed TensorRT has NetworkDefinitionCreationFlag.STRONGLY_TYPED
  (opt-in in TensorRT 10, the only mode in TensorRT 11, which removed the precision builder
  flags and calibrators): precision comes from the graph, so int8 comes from the QDQ nodes of
  `lathe export --target tensorrt` and fp16 from a cast pass run on the ONNX before the build
  (modelopt.onnx.autocast when importable, else cast_fp16() below).
- parse_shapes()/parse_profiles(): `input_ids:1x16,attention_mask:1x16` strings.
- TrtRunner: runs an engine on torch CUDA tensors, on the current stream.

Everything except the build and the runner (the shape parser, the fp16 cast pass) works
without tensorrt and is tested on CPU.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from lathe.errors import BadInput

INSTALL = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"

# Ops kept in float32 by the fp16 cast pass (normalizations, reductions and transcendental
# functions lose accuracy or overflow in fp16). Q/DQ stay fp32 below opset 19, where their
# scales and inputs must be float32.
FP32_OPS = frozenset({"LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf",
                      "LogSoftmax", "GroupNormalization", "InstanceNormalization",
                      "RMSNormalization", "ReduceSum", "ReduceSumSquare", "ReduceL2",
                      "ReduceLogSumExp", "Exp", "Log", "Range", "Resize", "TopK",
                      "NonMaxSuppression", "RoiAlign", "CumSum", "RandomNormal", "RandomUniform",
                      "RandomNormalLike", "RandomUniformLike", "EyeLike"})
# Elementwise ops that join a neighbouring fp32 region when they sit between fp32 nodes (the
# "paths" of LayerNorm's variance or GELU's erf: x - mean -> Pow -> ReduceMean -> Add eps -> Sqrt).
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Reciprocal"})
FP16_MAX = 65504.0


def require_tensorrt():
    """The tensorrt module, or BadInput saying what is missing (package or GPU)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BadInput(f"TensorRT is not installed: the tensorrt package and an NVIDIA GPU are needed "
                       f"({INSTALL})") from None
    import torch
    if not torch.cuda.is_available():
        raise BadInput("TensorRT needs an NVIDIA GPU and none is visible (torch.cuda.is_available() is "
                       f"False); the tensorrt package is installed ({INSTALL} on a GPU machine)")
    return trt


# ----------------------------------------------------------------------------- shapes

_SHAPE_ITEM = re.compile(r"^\s*([^:,\s][^:,]*?)\s*:\s*(\d+(?:\s*[xX]\s*\d+)*)\s*$")


def parse_shapes(s: str | dict | None) -> dict:
    """"input_ids:1x16,attention_mask:1x16" -> {"input_ids": (1, 16), ...}. A dict passes
    through (values made tuples of ints). BadInput on anything malformed."""
    if s is None:
        return {}
    if isinstance(s, dict):
        try:
            return {str(k): tuple(int(d) for d in v) for k, v in s.items()}
        except (TypeError, ValueError):
            raise BadInput(f"bad shapes {s!r}: expected {{name: (d0, d1, ...)}}") from None
    if not isinstance(s, str) or not s.strip():
        raise BadInput(f"bad shapes {s!r}: expected NAME:DxD[,NAME:DxD...], e.g. input_ids:1x16")
    out = {}
    for item in s.split(","):
        m = _SHAPE_ITEM.match(item)
        if not m:
            raise BadInput(f"bad shape {item.strip()!r} in {s!r}: expected NAME:DxD (e.g. input_ids:1x16)")
        name, dims = m.group(1), tuple(int(d) for d in re.split(r"\s*[xX]\s*", m.group(2).strip()))
        if name in out:
            raise BadInput(f"input {name!r} appears twice in {s!r}")
        out[name] = dims
    return out


def parse_profiles(min_shapes=None, opt_shapes=None, max_shapes=None) -> dict | None:
    """One optimization profile {input: (min, opt, max)} from the three shape strings (or
    dicts). A missing one is filled from the others (opt from max, then min; min and max from
    opt), as trtexec does with --shapes. None when none is given."""
    mn, op, mx = parse_shapes(min_shapes), parse_shapes(opt_shapes), parse_shapes(max_shapes)
    if not (mn or op or mx):
        return None
    names = list(dict.fromkeys([*mn, *op, *mx]))
    prof = {}
    for n in names:
        o = op.get(n) or mx.get(n) or mn.get(n)
        a, c = mn.get(n, o), mx.get(n, o)
        if not (len(a) == len(o) == len(c)):
            raise BadInput(f"input {n!r}: min/opt/max shapes {a}/{o}/{c} differ in rank")
        if any(not (x <= y <= z) for x, y, z in zip(a, o, c)):
            raise BadInput(f"input {n!r}: needs min <= opt <= max on every axis, got {_fmt(a)}/{_fmt(o)}/{_fmt(c)}")
        if any(x < 1 for x in a):
            raise BadInput(f"input {n!r}: shapes must be positive, got min {_fmt(a)}")
        prof[n] = (a, o, c)
    return prof


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


# ----------------------------------------------------------------------------- fp16 cast pass


def cast_fp16(model, keep_fp32=FP32_OPS, keep_io_types: bool = True):
    """float32 -> float16 for TensorRT's strongly typed networks (precision comes from the
    graph). Nodes in `keep_fp32` (and elementwise ops sitting between two of them) stay fp32
    with Casts at the boundaries; float initializers read by fp16 nodes are converted
    (clamped to +-65504, so a -1e30 mask constant stays finite); float graph inputs/outputs
    keep float32 with a Cast inside (keep_io_types). Nodes with subgraphs, non-standard
    domains and the tensors their subgraphs read stay fp32. Returns a new ModelProto."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if not keep_io_types:
        raise NotImplementedError("cast_fp16 keeps float32 graph inputs/outputs (keep_io_types=True)")
    model = onnx.ModelProto.FromString(model.SerializeToString()) if isinstance(model, onnx.ModelProto) \
        else onnx.load(str(model))
    FLOAT, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    opset = {o.domain or "": o.version for o in model.opset_import}.get("", 18)
    keep = set(keep_fp32) | ({"QuantizeLinear", "DequantizeLinear"} if opset < 19 else set())
    try:
        typed = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:
        typed = model.graph
    g = model.graph
    types = {}
    for vi in list(typed.input) + list(typed.output) + list(typed.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        types[t.name] = t.data_type
    nodes = list(g.node)
    for n in nodes:
        if n.op_type == "Constant":
            v = next((a.t for a in n.attribute if a.name == "value"), None)
            if v is not None:
                types[n.output[0]] = v.data_type

    def has_sub(n):
        return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)

    def sub_reads(n, acc):
        for a in n.attribute:
            for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for m in sg.node:
                    acc.update(x for x in m.input if x)
                    sub_reads(m, acc)
        return acc

    outer_reads = set()
    for n in nodes:
        if has_sub(n):
            sub_reads(n, outer_reads)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    consumers = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers.setdefault(x, []).append(i)
    graph_out = {o.name for o in g.output}

    fp32 = [n.op_type in keep or (n.domain or "") not in ("", "ai.onnx") or has_sub(n)
            or any(o in outer_reads for o in n.output) for n in nodes]
    changed = True
    while changed:  # elementwise ops between fp32 nodes join them
        changed = False
        for i, n in enumerate(nodes):
            if fp32[i] or n.op_type not in _ELEMENTWISE:
                continue
            from_fp32 = any(x in producer and fp32[producer[x]] for x in n.input)
            outs = [c for o in n.output for c in consumers.get(o, [])]
            if from_fp32 and outs and all(fp32[c] for c in outs) and not any(o in graph_out for o in n.output):
                fp32[i] = changed = True

    def is_float(name):
        return types.get(name) == FLOAT

    # Float graph outputs produced by fp16 nodes: the node writes NAME__fp16, a Cast makes NAME.
    tail = []
    for o in g.output:
        if keep_io_types and is_float(o.name) and o.name in producer and not fp32[producer[o.name]]:
            i = producer[o.name]
            new = o.name + "__fp16"
            nodes[i].output[list(nodes[i].output).index(o.name)] = new
            for c in consumers.get(o.name, []):
                for j, x in enumerate(nodes[c].input):
                    if x == o.name:
                        nodes[c].input[j] = new
            types[new] = FLOAT
            producer[new] = i
            tail.append(helper.make_node("Cast", [new], [o.name], to=FLOAT, name=f"{o.name}__cast_fp32"))

    def cur_type(name):
        """A float tensor's type after the pass."""
        if name in producer:
            return FLOAT if fp32[producer[name]] else F16
        return FLOAT  # graph inputs (kept) and initializers (converted on demand, below)

    made, new_inits, out_nodes = {}, [], []

    def as_type(name, want):
        key = (name, want)
        if key in made:
            return made[key]
        if name in inits and name not in producer:
            arr = numpy_helper.to_array(inits[name])
            if want == F16:
                arr = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
            new = f"{name}__{'fp16' if want == F16 else 'fp32'}"
            new_inits.append(numpy_helper.from_array(arr, new))
        else:
            new = f"{name}__cast_{'fp16' if want == F16 else 'fp32'}"
            out_nodes.append(helper.make_node("Cast", [name], [new], to=want, name=new))
        made[key] = new
        return new

    for i, n in enumerate(nodes):
        want = FLOAT if fp32[i] else F16
        if n.op_type not in ("Cast", "Shape", "Size", "CastLike"):
            for j, x in enumerate(n.input):
                if not x or not is_float(x):
                    continue
                have = FLOAT if (x in inits and x not in producer) else cur_type(x)
                if have != want:
                    n.input[j] = as_type(x, want)
        if not fp32[i]:
            for a in n.attribute:
                if a.name == "to" and n.op_type == "Cast" and a.i == FLOAT:
                    a.i = F16
                elif a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT:
                    arr = np.clip(numpy_helper.to_array(a.t), -FP16_MAX, FP16_MAX).astype(np.float16)
                    a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
                elif a.name == "value_float":
                    a.f = float(np.clip(a.f, -FP16_MAX, FP16_MAX))
        out_nodes.append(n)
    out_nodes.extend(tail)

    # graph inputs: float inputs stay float32 (keep_io_types), their fp16 readers get a Cast
    used = {x for n in out_nodes for x in n.input}
    keep_inits = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    del g.node[:]
    g.node.extend(out_nodes)
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    del g.value_info[:]  # stale float types; shape inference fills them again
    return model


def autocast_fp16(onnx_path, out_path) -> tuple[Path, str]:
    """fp16 ONNX for a strongly typed build: ModelOpt's AutoCast when importable, else
    cast_fp16(). Returns (path, which tool)."""
    import onnx

    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except Exception:
        convert_to_mixed_precision = None
    if convert_to_mixed_precision is not None:
        m = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                       op_types_to_exclude=sorted(FP32_OPS), keep_io_types=True)
        tool = "modelopt.onnx.autocast"
    else:
        m = cast_fp16(onnx.load(str(onnx_path)))
        tool = "lathe cast_fp16"
    onnx.save(m, str(out_path))
    return Path(out_path), tool


# ----------------------------------------------------------------------------- build


def _logger(trt):
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            S = trt.ILogger.Severity
            if severity in (S.INTERNAL_ERROR, S.ERROR):
                self.errors.append(str(msg))
            if severity in (S.INTERNAL_ERROR, S.ERROR, S.WARNING):
                import sys
                print(f"[tensorrt] {msg}", file=sys.stderr)

    return Logger()


def _atomic_write(path: Path, data: bytes):
    from lathe.io import write_bytes

    write_bytes(path, data)


def build_engine(onnx_path, engine_path, min_shapes=None, opt_shapes=None, max_shapes=None,
                 fp16: bool = False, workspace_gb: float = 4, timing_cache=None) -> Path:
    """Build a serialized TensorRT engine from `onnx_path` and write it to `engine_path`
    (atomically). Shapes: strings like "input_ids:1x16,attention_mask:1x16" or dicts; every
    input with a dynamic dimension needs one. fp16: cast the graph first (strongly typed
    networks take precision from the graph). timing_cache: a file read if present and written
    back after the build."""
    import tempfile

    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise BadInput(f"no such ONNX file: {onnx_path}")
    if workspace_gb <= 0:
        raise BadInput(f"workspace must be positive, got {workspace_gb} GB")
    profile_shapes = parse_profiles(min_shapes, opt_shapes, max_shapes) or {}
    logger = _logger(trt)
    with tempfile.TemporaryDirectory(prefix="lathe-trt-") as tmpdir:
        src = onnx_path
        if fp16:
            src, _ = autocast_fp16(onnx_path, Path(tmpdir) / "model-fp16.onnx")
        try:
            builder = trt.Builder(logger)
        except Exception as e:  # "CUDA initialization failure"
            raise BadInput(f"TensorRT could not start on this machine ({str(e).splitlines()[0]}); it needs "
                           "a working NVIDIA GPU and driver") from None
        if builder is None:
            raise BadInput("TensorRT could not create a builder: " + "; ".join(logger.errors[-3:]))
        flags = 0
        typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if typed_flag is not None:
            flags |= 1 << int(typed_flag)
        explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
        if typed_flag is None and explicit is not None:  # TensorRT 8.x
            flags |= 1 << int(explicit)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(src)):
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BadInput(f"TensorRT's ONNX parser refused {onnx_path}: " + " | ".join(errs[:3]).replace("\n", " ")
                           + " (run `lathe export ... --lint tensorrt` for the full list)")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if typed_flag is None:  # weakly typed (TensorRT < 10 without the flag): builder flags
            if fp16 and hasattr(trt.BuilderFlag, "FP16"):
                config.set_flag(trt.BuilderFlag.FP16)
            if hasattr(trt.BuilderFlag, "INT8"):
                config.set_flag(trt.BuilderFlag.INT8)  # explicit QDQ needs it there
        # optimization profile
        profile = builder.create_optimization_profile()
        needed = []
        for i in range(network.num_inputs):
            t = network.get_input(i)
            dims = tuple(t.shape)
            if t.name in profile_shapes:
                mn, op, mx = profile_shapes[t.name]
                if len(mn) != len(dims):
                    raise BadInput(f"input {t.name!r} has rank {len(dims)} but its shapes have rank {len(mn)}")
                for ax, d in enumerate(dims):
                    if d >= 0 and not (mn[ax] == mx[ax] == d):
                        raise BadInput(f"input {t.name!r} axis {ax} is static ({d}); its shapes give {mn[ax]}..{mx[ax]}")
                profile.set_shape(t.name, mn, op, mx)
            elif any(d < 0 for d in dims):
                needed.append(t.name)
        unknown = sorted(set(profile_shapes) - {network.get_input(i).name for i in range(network.num_inputs)})
        if unknown:
            raise BadInput(f"shapes given for {', '.join(unknown)}, which the model does not take as input")
        if needed:
            raise BadInput(f"dynamic input(s) {', '.join(needed)} need shapes: pass --min-shapes/--opt-shapes/"
                           f"--max-shapes, e.g. {needed[0]}:1x16")
        if profile_shapes:
            config.add_optimization_profile(profile)
        cache = None
        if timing_cache is not None:
            blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BadInput(f"TensorRT could not build an engine from {onnx_path}: "
                           + ("; ".join(logger.errors[-3:]) or "see the log above").replace("\n", " "))
        _atomic_write(engine_path, bytes(serialized))
        if timing_cache is not None:
            _atomic_write(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    return engine_path


# ----------------------------------------------------------------------------- run


class TrtRunner:
    """Runs a serialized engine on torch CUDA tensors: runner(input_ids=..., ...) or
    runner.run({name: tensor}) -> {output name: tensor}, enqueued on the current CUDA stream
    (synchronize, or use the outputs on that stream)."""

    def __init__(self, engine_path):
        trt = require_tensorrt()
        import torch

        self.trt = trt
        path = Path(engine_path)
        if not path.is_file():
            raise BadInput(f"no such TensorRT engine: {path}")
        self.logger = _logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BadInput(f"{path} is not an engine this TensorRT can load (built by another TensorRT "
                           f"version or GPU?): " + "; ".join(self.logger.errors[-2:]))
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_in[n]]
        self.outputs = [n for n in names if not is_in[n]]
        dt = trt.DataType
        table = {dt.FLOAT: torch.float32, dt.HALF: torch.float16, dt.INT32: torch.int32,
                 dt.INT8: torch.int8, dt.BOOL: torch.bool}
        for name, tdt in (("INT64", torch.int64), ("UINT8", torch.uint8), ("BF16", torch.bfloat16)):
            if hasattr(dt, name):
                table[getattr(dt, name)] = tdt
        self.dtypes = {}
        for n in names:
            d = self.engine.get_tensor_dtype(n)
            if d not in table:
                raise BadInput(f"engine I/O tensor {n!r} has type {d}, which TrtRunner cannot hold in torch")
            self.dtypes[n] = table[d]

    def __call__(self, **feed):
        return self.run(feed)

    def run(self, feed: dict) -> dict:
        import torch

        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise BadInput(f"the engine needs input(s) {', '.join(missing)}")
        stream = torch.cuda.current_stream()
        keep = []
        for n in self.inputs:
            t = torch.as_tensor(feed[n]).to(device="cuda", dtype=self.dtypes[n]).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise BadInput(f"input {n!r} shape {tuple(t.shape)} is outside the engine's optimization profile")
            self.context.set_tensor_address(n, t.data_ptr())
        outs = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise NotImplementedError(f"output {n!r} has a data-dependent shape {shape}; TrtRunner needs "
                                          "shapes known from the inputs")
            outs[n] = torch.empty(shape, dtype=self.dtypes[n], device="cuda")
            self.context.set_tensor_address(n, outs[n].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed: " + "; ".join(self.logger.errors[-2:]))
        for t in keep:  # inputs must outlive the enqueued work
            t.record_stream(stream)
        return outs


# ----------------------------------------------------------------------------- export


# Used when no shapes are given: lathe's exports take [batch, seq] inputs.
DEFAULT_SHAPES = ("1x1", "8x128", "32x512")


def export_tensorrt(src, out, min_shapes=None, opt_shapes=None, max_shapes=None, fp16: bool = False,
                    workspace_gb: float = 4, timing_cache=None, opset: int = 18, validate: bool = True,
                    log=print, force: bool = False):
    """`lathe export SRC --to tensorrt`: export ONNX with the tensorrt target (symmetric
    static QDQ for int8 checkpoints) to a temporary file, validate it on onnxruntime, lint it
    (findings go to `log`; error findings stop the build unless validate is False), then build
    the engine at `out`. Returns (engine path, validation report or None, lint findings)."""
    import tempfile

    from lathe.errors import ValidationFailed
    from lathe.export.onnx import export_onnx
    from lathe.export.trt_lint import lint

    require_tensorrt()  # fail in a second, not after the export
    given = (min_shapes, opt_shapes, max_shapes)
    profiles = parse_profiles(*given)  # BadInput on malformed strings, before any work
    from lathe.io import claim
    from lathe.source import open_source
    with claim(out, "engine", [open_source(src).path], force, is_dir=False), \
            tempfile.TemporaryDirectory(prefix="lathe-trt-") as tmpdir:
        onnx_path = Path(tmpdir) / "model.onnx"
        _, report = export_onnx(src, onnx_path, target="tensorrt", opset=opset, validate=validate)
        if report is not None:
            log(report.summary())
        if profiles is None:
            import onnx
            m = onnx.load(str(onnx_path), load_external_data=False)
            inits = {t.name for t in m.graph.initializer}
            names = [i.name for i in m.graph.input if i.name not in inits]
            given = tuple(",".join(f"{n}:{s}" for n in names) for s in DEFAULT_SHAPES)
            profiles = parse_profiles(*given)
            log(f"no --min/--opt/--max-shapes given: using {' / '.join(DEFAULT_SHAPES)} for {', '.join(names)}")
        findings = lint(onnx_path, profiles)
        log(findings.summary())
        if findings.errors and validate:
            raise ValidationFailed(f"TensorRT lint found {len(findings.errors)} error(s) in the exported graph "
                                   f"(first: {findings.errors[0]}); --no-validate builds anyway")
        path = build_engine(onnx_path, out, *given, fp16=fp16, workspace_gb=workspace_gb,
                            timing_cache=timing_cache)
    return path, report, findings
