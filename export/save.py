"""Writing an exported graph: atomically, with its weights in an external data file
(`model.onnx` + `model.onnx.data`) when the protobuf would pass the 2 GB limit or when asked,
and optionally simplified by onnxslim."""
from __future__ import annotations

import os
from pathlib import Path

from lathe.errors import BadInput

PROTO_LIMIT = 2**31  # protobuf's hard limit on a serialized message
MARGIN = 64 << 20    # room for the graph itself beside the weights


def data_path(out: Path) -> Path:
    return out.with_name(out.name + ".data")


def weight_bytes(model) -> int:
    """Bytes of the initializers of an onnx_ir Model."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def wants_external(model, external_data: bool | None) -> bool:
    if external_data is not None:
        return bool(external_data)
    return weight_bytes(model) + MARGIN >= PROTO_LIMIT


def save_ir(model, out: Path, external_data: bool | None = None) -> Path:
    """Save an onnx_ir Model to `out` (producer "lathe": lathe.io recognises its own outputs).
    With external data both files are written in a temp folder beside `out` under their final
    names (the graph names its data file), each through lathe.io.atomic_file, data first, so a
    reader never sees a graph without its data. A stale data file from an earlier export is
    removed."""
    import onnx_ir as ir

    from lathe.io import atomic_file, temp_dir_beside

    out = Path(out)
    model.producer_name = "lathe"
    import lathe
    model.producer_version = lathe.__version__
    external = wants_external(model, external_data)
    with temp_dir_beside(out) as d:
        tmp = d / out.name
        if external:
            ir.save(model, tmp, external_data=data_path(out).name, size_threshold_bytes=1024)
            with atomic_file(data_path(out)) as t:
                os.replace(data_path(tmp), t)
        else:
            ir.save(model, tmp)
        with atomic_file(out) as t:
            os.replace(tmp, t)
        if not external:
            data_path(out).unlink(missing_ok=True)
    return out


def slim(out: Path) -> Path:
    """Simplify `out` in place with onnxslim (constant folding, dead code, fusions), keeping
    external data if the graph had it."""
    try:
        import onnxslim
    except ImportError:
        raise BadInput("--slim needs the onnxslim package: pip install onnxslim") from None
    import onnx
    import onnx_ir as ir

    out = Path(out)
    external = data_path(out).exists()
    proto = onnxslim.slim(onnx.load(str(out)))
    if proto is None:
        raise BadInput(f"onnxslim could not simplify {out}")
    return save_ir(ir.from_proto(proto), out, external_data=external or None)
