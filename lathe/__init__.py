"""lathe: compress PyTorch models, export them, and prove the speed-up on lathe's own kernels.

Importing lathe is cheap: it never initialises CUDA and never needs a GPU, TensorRT or the
CUDA extension. Each feature imports what it needs when it is used.
"""
__version__ = "0.1.0"

# lathe.compress, lathe.export, lathe.bench and lathe.kernels are subpackages; the verbs below
# are the one-call forms of the main jobs.
__all__ = ["load", "compress_checkpoint", "export_onnx", "__version__"]


def _efficientnet_lite0():
    from lathe.models.efficientnet import embedded_checkpoint

    return embedded_checkpoint()


def _register_embedded():
    """The embedded checkpoint names that need a model family (lathe.source is core: it may
    not import lathe.models itself)."""
    from lathe import source

    source.EMBEDDED.setdefault("efficientnet-lite0", _efficientnet_lite0)


_register_embedded()


def load(path, device: str = "cpu", dtype=None):
    """Load a Hugging Face checkpoint directory or a lathe compressed directory as a
    torch.nn.Module whose hot ops run through torch.ops.lathe.* (lathe's kernels).

    device: "cpu" or "cuda[:N]"; the weights go straight from safetensors to it. dtype:
    torch.float16 / bfloat16 / float32, the activation dtype (weights, scales and biases are
    stored in it once, at load); None keeps the checkpoint's dtypes."""
    from lathe.compress.checkpoint import load as _load

    return _load(path, device, dtype)


def compress_checkpoint(src, recipe, out, calib=None, progress=None, backend="lathe", force=False):
    """Compress checkpoint `src` with `recipe` (preset name or YAML path) into directory `out`;
    backend "modelopt" calibrates with NVIDIA ModelOpt (pip install 'lathe[modelopt]')."""
    from lathe.compress.pipeline import compress_checkpoint as _run

    return _run(src, recipe, out, calib, progress, backend, force)


def export_onnx(src, out, **kw):
    from lathe.export.onnx import export_onnx as _export

    return _export(src, out, **kw)
