"""TensorRT readiness lint for ONNX graphs, on CPU (no tensorrt package, no GPU).

`lint(model_or_path, profiles=None)` returns Findings (a list of Finding) naming, for each
problem, the node (or graph input) at fault: what TensorRT 10's ONNX parser refuses (errors)
and what it accepts but runs slowly or converts (warnings).

- asymmetric QDQ: QuantizeLinear/DequantizeLinear with a non-zero (or non-constant, or uint8)
  zero point; TensorRT accepts symmetric int8/fp8 QDQ only.
- ops: an explicit allow-list of the ONNX ops TensorRT 10 imports and a deny-list of known
  unsupported ones (MatMulInteger, ConvInteger, DynamicQuantizeLinear, QLinear*, Unique,
  sequence and string ops); com.microsoft.* contrib ops and other custom domains.
- attributes: Resize modes TensorRT lacks (tf_crop_and_resize, antialias, aspect-ratio
  policies, exclude_outside), GatherND batch_dims, Einsum ellipsis, Pad wrap, TopK's K and
  Slice/Squeeze/Unsqueeze axes that are not constants.
- data-dependent shapes: NonZero/Unique/NonMaxSuppression/Compress outputs that reach a shape
  input (Reshape's shape, Expand, Tile, Slice bounds, ConstantOfShape...), Loop trip counts
  and If conditions that are not build-time constants.
- shapes: dynamic input dimensions without an optimization profile, and profiles that do not
  match the inputs.
- types: int64 graph inputs and large int64 initializers (TensorRT converts them), int64
  constants that overflow int32, double tensors, string tensors.

The op lists follow the onnx-tensorrt operator matrix for TensorRT 10.x (docs/operators.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ERROR, WARNING = "error", "warning"

# ONNX ops (default domain) that TensorRT 10's ONNX parser imports.
ALLOWED_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool
BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze STFT Sub Sum
Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Standard ops only recent TensorRT 10.x parsers import (opset 23/24 additions).
RECENT_OPS = frozenset({"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"})

SEQUENCE_OPS = frozenset({"SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
                          "SequenceInsert", "SequenceLength", "SequenceMap", "SplitToSequence",
                          "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement"})

DENIED_OPS = {
    "MatMulInteger": "integer GEMM with zero points; export QDQ instead (lathe export --target tensorrt)",
    "ConvInteger": "integer convolution with zero points; use QDQ around Conv",
    "DynamicQuantizeLinear": "dynamic (data-dependent) uint8 quantization; TensorRT needs static symmetric QDQ",
    "QLinearMatMul": "operator-style quantization; use QDQ around MatMul",
    "QLinearConv": "operator-style quantization; use QDQ around Conv",
    "Unique": "data-dependent output shape, not imported",
    "Compress": "data-dependent output shape, not imported",
    "BitShift": "not imported", "BitwiseAnd": "not imported", "BitwiseNot": "not imported",
    "BitwiseOr": "not imported", "BitwiseXor": "not imported", "Col2Im": "not imported",
    "CenterCropPad": "not imported", "DFT": "not imported", "Det": "not imported",
    "MaxRoiPool": "not imported", "MaxUnpool": "not imported", "Multinomial": "not imported",
    "MelWeightMatrix": "not imported", "NegativeLogLikelihoodLoss": "training op, not imported",
    "SoftmaxCrossEntropyLoss": "training op, not imported", "Bernoulli": "not imported",
    "ImageDecoder": "not imported",
    "StringConcat": "string tensors are not supported", "StringNormalizer": "string tensors are not supported",
    "StringSplit": "string tensors are not supported", "RegexFullMatch": "string tensors are not supported",
    "TfIdfVectorizer": "string/ngram op, not imported",
}

# Ops whose outputs have data-dependent shapes.
DDS_SOURCES = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress"})

# Inputs that TensorRT needs as shape tensors (build-time computable from input shapes).
SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2), "Resize": (2, 3), "Upsample": (1,), "TopK": (1,), "OneHot": (1,),
    "Pad": (1, 3), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "ReduceSum": (1,),
    "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL1": (1,),
    "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
    "Loop": (0,), "Trilu": (1,), "CumSum": (1,), "EyeLike": (), "RandomNormalLike": (),
}

# Inputs that must be constants (initializers/Constant) for TensorRT's importer.
CONST_INPUTS = {"TopK": ((1, "K"),), "Slice": ((3, "axes"),), "Squeeze": ((1, "axes"),),
                "Unsqueeze": ((1, "axes"),), "CumSum": ((1, "axis"),)}

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
INT64_SENTINELS = (np.iinfo(np.int64).max, np.iinfo(np.int64).min)
LARGE_INT64 = 1024  # elements: an int64 initializer this big is worth converting ahead of time


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" (TensorRT refuses it) or "warning" (converted or slow)
    code: str
    node: str  # node name, or the graph input's name
    op_type: str  # op type, or "graph-input" / "graph-output"
    message: str

    def __str__(self):
        return f"{self.severity}: [{self.code}] {self.node} ({self.op_type}): {self.message}"

    def to_dict(self):
        return asdict(self)


class Findings(list):
    """A list of Finding with counts and a text summary."""

    @property
    def errors(self):
        return [f for f in self if f.severity == ERROR]

    @property
    def warnings(self):
        return [f for f in self if f.severity == WARNING]

    def summary(self, max_lines: int = 50) -> str:
        head = (f"TensorRT lint: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
                + ("" if self else " - the graph looks TensorRT-ready"))
        ordered = self.errors + self.warnings
        lines = [f"  {f}" for f in ordered[:max_lines]]
        if len(ordered) > max_lines:
            lines.append(f"  ... and {len(ordered) - max_lines} more")
        return "\n".join([head] + lines)


def summary(findings) -> str:
    return Findings(findings).summary()


# --------------------------------------------------------------------------------- helpers


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model_or_path))
    p = Path(model_or_path)
    if not p.is_file():
        from lathe.errors import BadInput
        raise BadInput(f"no such ONNX file: {p}")
    try:
        return onnx.load(str(p))
    except Exception as e:  # protobuf decode errors
        from lathe.errors import BadInput
        raise BadInput(f"{p} is not an ONNX model: {type(e).__name__}: {e}") from None


def _node_name(node, index: int, prefix: str = "") -> str:
    return prefix + (node.name or f"{node.op_type}#{index}")


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _subgraphs(node):
    import onnx

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def _walk(graph, prefix=""):
    """(node, display name) for the graph's nodes and, recursively, its subgraphs'."""
    for i, n in enumerate(graph.node):
        name = _node_name(n, i, prefix)
        yield n, name
        for attr, g in _subgraphs(n):
            yield from _walk(g, f"{name}/{attr}/")


def _dims(vi):
    """[int or None (dynamic)] for a ValueInfo, or None when its shape is unknown."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _normalize_profiles(profiles):
    """profiles: {input: (min, opt, max)}, a list of such dicts, or {input: shape} (min = opt
    = max). Returns a list of {input: (min, opt, max)} with tuples of ints."""
    if profiles is None:
        return None
    if isinstance(profiles, dict):
        profiles = [profiles]
    out = []
    for prof in profiles:
        norm = {}
        for name, v in prof.items():
            v = tuple(v)
            if v and all(isinstance(x, (int, np.integer)) for x in v):
                v = (v, v, v)
            if len(v) != 3:
                raise ValueError(f"profile for {name!r} must be (min, opt, max) shapes, got {v!r}")
            norm[name] = tuple(tuple(int(d) for d in s) for s in v)
        out.append(norm)
    return out


# ----------------------------------------------------------------------------------- lint


def lint(model_or_path, profiles=None) -> Findings:
    """TensorRT readiness findings for an ONNX model (ModelProto, bytes or path).

    profiles: optimization profiles the engine will be built with: {input: (min, opt, max)}
    (or a list of them, one per profile); lathe.export.tensorrt.parse_profiles builds one from
    `--min-shapes/--opt-shapes/--max-shapes` strings. Without profiles, dynamic input
    dimensions are flagged."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = _load(model_or_path)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    out = Findings()

    def add(sev, code, node, op, msg):
        out.append(Finding(sev, code, node, op, msg))

    # ---- opset
    opsets = {o.domain or "": o.version for o in model.opset_import}
    ver = opsets.get("", opsets.get("ai.onnx", 0))
    if ver and ver < 9:
        add(ERROR, "opset-too-old", "<model>", "opset", f"opset {ver}: TensorRT 10 imports opsets 9 and newer")
    elif ver > 22:
        add(WARNING, "opset-new", "<model>", "opset",
            f"opset {ver}: TensorRT 10.x parsers import opsets up to 20-22 depending on the release; "
            "newer models need a recent TensorRT (or export with --opset 18)")

    # ---- what every tensor is: types, constants, producers, consumers
    types = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    consts = {}
    for init in g.initializer:
        types[init.name] = init.data_type
        consts[init.name] = init
    producer, consumers = {}, {}
    node_names = {}
    for i, n in enumerate(g.node):
        node_names[id(n)] = _node_name(n, i)
        for o in n.output:
            producer[o] = n
        for j, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n, j))
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            v = _attr(n, "value")
            if isinstance(v, TensorProto):
                consts[n.output[0]] = v
                types[n.output[0]] = v.data_type

    def const_array(name):
        t = consts.get(name)
        if t is None:
            return None
        try:
            return numpy_helper.to_array(t)
        except Exception:
            return None

    def first_consumer(name):
        c = consumers.get(name)
        if not c:
            return name, "initializer"
        return node_names[id(c[0][0])], c[0][0].op_type

    graph_inputs = [vi for vi in g.input if vi.name not in consts]

    # ---- graph inputs: dynamic dims vs profiles, types
    plist = _normalize_profiles(profiles)
    for vi in graph_inputs:
        dims = _dims(vi)
        et = types.get(vi.name)
        dynamic = dims is None or any(d is None for d in dims)
        if dynamic and plist is None:
            shown = "?" if dims is None else "x".join("?" if d is None else str(d) for d in dims)
            add(WARNING, "dynamic-shape-no-profile", vi.name, "graph-input",
                f"dynamic shape [{shown}] and no optimization profile: give --min-shapes/--opt-shapes/"
                "--max-shapes (TensorRT builds one engine per range of shapes)")
        if et == TensorProto.INT64:
            add(WARNING, "int64-input", vi.name, "graph-input",
                "int64 input: TensorRT 10 runs int64 indices but most layers compute in int32 and "
                "insert casts; feed int32 where the model allows (TensorRT < 10 casts it down)")
        elif et == TensorProto.DOUBLE:
            add(ERROR, "double", vi.name, "graph-input", "double input: TensorRT has no FP64 I/O; use float32")
        elif et == TensorProto.STRING:
            add(ERROR, "string-tensor", vi.name, "graph-input", "string input: TensorRT has no string tensors")
    for vo in g.output:
        et = types.get(vo.name)
        if et in (TensorProto.DOUBLE, TensorProto.STRING):
            add(ERROR, "double" if et == TensorProto.DOUBLE else "string-tensor", vo.name, "graph-output",
                f"{TensorProto.DataType.Name(et).lower()} output: not a TensorRT I/O type")
    if plist is not None:
        by_name = {vi.name: vi for vi in graph_inputs}
        for k, prof in enumerate(plist):
            tag = f"profile {k}" if len(plist) > 1 else "profile"
            for name in prof:
                if name not in by_name:
                    add(ERROR, "profile-unknown-input", name, "graph-input",
                        f"{tag} names {name!r}, which is not a graph input (inputs: {', '.join(by_name)})")
            for name, vi in by_name.items():
                dims = _dims(vi)
                dynamic = dims is None or any(d is None for d in dims)
                if name not in prof:
                    if dynamic:
                        add(ERROR, "profile-missing-input", name, "graph-input",
                            f"dynamic input has no shape in the {tag}")
                    continue
                mn, op_, mx = prof[name]
                if dims is not None and not (len(mn) == len(op_) == len(mx) == len(dims)):
                    add(ERROR, "bad-profile", name, "graph-input",
                        f"{tag} shapes {mn}/{op_}/{mx} do not have the input's rank {len(dims)}")
                    continue
                if not (len(mn) == len(op_) == len(mx)):
                    add(ERROR, "bad-profile", name, "graph-input", f"{tag} shapes {mn}/{op_}/{mx} differ in rank")
                    continue
                if any(not (a <= b <= c) for a, b, c in zip(mn, op_, mx)) or any(a < 0 for a in mn):
                    add(ERROR, "bad-profile", name, "graph-input", f"{tag} needs 0 <= min <= opt <= max, got {mn}/{op_}/{mx}")
                if dims is not None:
                    for ax, (d, a, c) in enumerate(zip(dims, mn, mx)):
                        if d is not None and not (a == c == d):
                            add(ERROR, "bad-profile", name, "graph-input",
                                f"{tag} varies static axis {ax} (size {d}): {a}..{c}")

    # ---- initializers / constants: double, string, int64
    for name, t in consts.items():
        where, op = first_consumer(name)
        if t.data_type == TensorProto.DOUBLE:
            add(WARNING, "double", where, op,
                f"double constant {name!r}: TensorRT casts FP64 weights to float32 (clamping to +-FLT_MAX)")
        elif t.data_type == TensorProto.STRING:
            add(ERROR, "string-tensor", where, op, f"string constant {name!r}: TensorRT has no string tensors")
        elif t.data_type == TensorProto.INT64:
            arr = const_array(name)
            if arr is None:
                continue
            vals = arr.ravel()
            bad = vals[((vals < INT32_MIN) | (vals > INT32_MAX)) & ~np.isin(vals, INT64_SENTINELS)]
            if bad.size:
                add(WARNING, "int64-overflow", where, op,
                    f"int64 constant {name!r} holds {bad.size} value(s) outside int32 (e.g. {int(bad[0])}); "
                    "TensorRT computes shapes and indices in int32 and clamps them")
            elif vals.size >= LARGE_INT64:
                add(WARNING, "int64-initializer", where, op,
                    f"int64 initializer {name!r} ({vals.size} elements): TensorRT converts it; store it as int32")

    # ---- intermediate tensors: double / string (from shape inference)
    for vi in g.value_info:
        et = types.get(vi.name)
        if et in (TensorProto.DOUBLE, TensorProto.STRING) and vi.name in producer:
            n = producer[vi.name]
            kind = "double" if et == TensorProto.DOUBLE else "string-tensor"
            sev = WARNING if et == TensorProto.DOUBLE else ERROR
            add(sev, kind, node_names[id(n)], n.op_type,
                f"produces a {TensorProto.DataType.Name(et).lower()} tensor {vi.name!r}")

    # ---- values known once the input shapes are: constants, Shape/Size, and ops of those
    static = set(consts)
    for n in g.node:
        if n.op_type in ("Shape", "Size"):
            static.update(n.output)
        elif (n.op_type not in DDS_SOURCES and not n.op_type.startswith("Random") and n.input
              and all(x == "" or x in static for x in n.input) and not any(True for _ in _subgraphs(n))):
            static.update(n.output)

    # ---- data-dependent shapes: taint from DDS ops to shape inputs
    taint = {}  # tensor -> (source node name, op)
    for i, n in enumerate(g.node):
        name = node_names[id(n)]
        src = next((taint[x] for x in n.input if x in taint), None)
        if src is not None:
            for j in SHAPE_INPUTS.get(n.op_type, ()):
                if j < len(n.input) and n.input[j] in taint:
                    s_name, s_op = taint[n.input[j]]
                    add(ERROR, "data-dependent-shape", name, n.op_type,
                        f"input {j} ({n.input[j]!r}) is a shape computed from the data-dependent output of "
                        f"{s_op} {s_name!r}; TensorRT needs shape tensors computable from input shapes")
        if n.op_type in DDS_SOURCES:
            src = (name, n.op_type)
        if src is not None:
            for o in n.output:
                taint[o] = src

    # ---- per node, main graph and subgraphs (whose own constants count as constants)
    for n, _ in _walk(model.graph):
        for _, sg in _subgraphs(n):
            for init in sg.initializer:
                consts.setdefault(init.name, init)
            for m in sg.node:
                if m.op_type == "Constant" and isinstance(_attr(m, "value"), TensorProto):
                    consts.setdefault(m.output[0], _attr(m, "value"))
    for n, name in _walk(model.graph):
        dom, op = n.domain or "", n.op_type
        if dom not in ("", "ai.onnx"):
            if dom.startswith("com.microsoft"):
                add(ERROR, "contrib-op", name, f"{dom}.{op}",
                    "onnxruntime contrib op: TensorRT has no importer for it (export with the standard-op lowering)")
            elif dom == "ai.onnx.ml":
                add(ERROR, "onnx-ml-op", name, f"{dom}.{op}", "ONNX-ML ops are not imported by TensorRT")
            elif dom in ("trt", "trt.plugins"):
                add(WARNING, "plugin-op", name, f"{dom}.{op}", "needs a TensorRT plugin registered at build time")
            else:
                add(ERROR, "custom-op", name, f"{dom}.{op}",
                    f"custom domain {dom!r}: TensorRT needs a plugin with this name")
            continue
        if op in DENIED_OPS:
            add(ERROR, "unsupported-op", name, op, DENIED_OPS[op])
        elif op in SEQUENCE_OPS:
            add(ERROR, "sequence-op", name, op, "sequence/optional types are not supported by TensorRT")
        elif op in RECENT_OPS:
            add(WARNING, "recent-op", name, op,
                f"{op} (opset 23+) is imported only by recent TensorRT 10.x releases; export with "
                "--opset 18 for the decomposed form if the build refuses it")
        elif op not in ALLOWED_OPS:
            add(WARNING, "unknown-op", name, op,
                "not in lathe's list of ops TensorRT 10 imports; check the onnx-tensorrt operator matrix")
        _check_node(n, name, const_array, consts, add)

    # top-level only: uses the top-level tables
    for i, n in enumerate(g.node):
        name = node_names[id(n)]
        for j, what in CONST_INPUTS.get(n.op_type, ()):
            if j < len(n.input) and n.input[j] and n.input[j] not in consts:
                sev = ERROR if n.op_type == "TopK" else WARNING
                add(sev, "non-constant-input", name, n.op_type,
                    f"`{what}` ({n.input[j]!r}) is not a constant; TensorRT's importer needs an initializer")
        if n.op_type in ("NonZero", "NonMaxSuppression"):
            add(WARNING, "data-dependent-output", name, n.op_type,
                "data-dependent output shape: TensorRT 10 runs it with an output allocator, which is slow "
                "and blocks fusion; avoid it on the hot path")
        if n.op_type == "Loop":
            trip = n.input[0] if len(n.input) > 0 else ""
            cond = n.input[1] if len(n.input) > 1 else ""
            if trip and trip not in static:
                add(ERROR, "data-dependent-loop", name, "Loop",
                    f"trip count {trip!r} depends on tensor values, not on input shapes: TensorRT needs "
                    "a trip count known when the shapes are (unroll the loop or compute M from shapes)")
            elif not trip and cond and cond not in static:
                add(ERROR, "data-dependent-loop", name, "Loop",
                    "no trip count and a data-dependent condition (a while loop): TensorRT needs a bounded "
                    "trip count")
        if n.op_type == "If" and n.input and n.input[0] not in static:
            add(WARNING, "data-dependent-if", name, "If",
                "condition depends on tensor values: TensorRT builds both branches, whose outputs must have "
                "compatible shapes, and picks one at run time")
        if n.op_type == "Cast" and _attr(n, "to") in (TensorProto.DOUBLE, TensorProto.STRING):
            to = TensorProto.DataType.Name(_attr(n, "to")).lower()
            add(ERROR if to == "string" else WARNING, "string-tensor" if to == "string" else "double",
                name, "Cast", f"casts to {to}: TensorRT has no {to} tensors")
    return out


def _check_node(n, name, const_array, consts, add):
    """Attribute and QDQ checks for one node."""
    op = n.op_type
    if op in ("QuantizeLinear", "DequantizeLinear"):
        from onnx import TensorProto

        zp = n.input[2] if len(n.input) > 2 else ""
        if zp:
            arr = const_array(zp)
            if arr is None and zp not in consts:
                add(ERROR, "asymmetric-qdq", name, op,
                    f"zero point {zp!r} is computed at run time: TensorRT needs a constant zero point of 0")
            elif arr is not None and np.any(arr.astype(np.float64) != 0):
                nz = arr.ravel()[arr.ravel() != 0]
                add(ERROR, "asymmetric-qdq", name, op,
                    f"non-zero zero point {zp!r} (e.g. {nz[0]}): TensorRT accepts symmetric QDQ only (zero point 0)")
            t = consts.get(zp)
            if t is not None and t.data_type == TensorProto.UINT8:
                add(ERROR, "qdq-uint8", name, op,
                    "uint8 quantization: TensorRT quantizes to int8 (or fp8/int4); use an int8 zero point")
        elif op == "QuantizeLinear":
            # without a zero point QuantizeLinear produces uint8 (unless output_dtype says otherwise)
            from onnx import TensorProto as TP
            if _attr(n, "output_dtype", 0) in (0, TP.UINT8):
                add(ERROR, "qdq-uint8", name, op,
                    "no zero point: the output is uint8; TensorRT needs an int8 zero point of 0")
        scale = n.input[1] if len(n.input) > 1 else ""
        if scale and scale not in consts:
            add(WARNING, "qdq-dynamic-scale", name, op,
                f"scale {scale!r} is not a constant: TensorRT needs build-time scales for int8 QDQ")
    elif op == "Resize":
        ctm = _attr(n, "coordinate_transformation_mode", b"half_pixel")
        ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
        mode = _attr(n, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if ctm == "tf_crop_and_resize":
            add(ERROR, "unsupported-attribute", name, op, "coordinate_transformation_mode tf_crop_and_resize is not supported")
        if mode not in ("nearest", "linear", "cubic"):
            add(ERROR, "unsupported-attribute", name, op, f"mode {mode!r} is not supported")
        if _attr(n, "antialias", 0):
            add(ERROR, "unsupported-attribute", name, op, "antialias=1 is not supported")
        if _attr(n, "exclude_outside", 0):
            add(ERROR, "unsupported-attribute", name, op, "exclude_outside=1 is not supported")
        pol = _attr(n, "keep_aspect_ratio_policy", b"stretch")
        pol = pol.decode() if isinstance(pol, bytes) else pol
        if pol != "stretch":
            add(ERROR, "unsupported-attribute", name, op, f"keep_aspect_ratio_policy {pol!r} is not supported")
        if _attr(n, "axes") is not None:
            add(WARNING, "unsupported-attribute", name, op, "the axes attribute needs a recent TensorRT")
    elif op == "GatherND" and _attr(n, "batch_dims", 0):
        add(WARNING, "unsupported-attribute", name, op,
            f"batch_dims={_attr(n, 'batch_dims')}: only recent TensorRT importers handle non-zero batch dims")
    elif op in ("Gather", "GatherElements") and _attr(n, "batch_dims", 0):
        add(ERROR, "unsupported-attribute", name, op, "batch_dims is not an attribute TensorRT knows")
    elif op == "Einsum":
        eq = _attr(n, "equation", b"")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        if "..." in eq:
            add(ERROR, "unsupported-attribute", name, op, f"equation {eq!r}: ellipsis is not supported")
    elif op == "Pad":
        mode = _attr(n, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "wrap":
            add(ERROR, "unsupported-attribute", name, op, "mode 'wrap' is not supported")
    elif op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
        ks = _attr(n, "kernel_shape")
        if ks is not None and len(ks) not in (1, 2, 3):
            add(ERROR, "unsupported-attribute", name, op, f"{len(ks)}-D kernels: only 1D/2D/3D are supported")
        if op == "MaxPool" and len(n.output) > 1 and n.output[1]:
            add(ERROR, "unsupported-attribute", name, op, "the Indices output is not supported")
