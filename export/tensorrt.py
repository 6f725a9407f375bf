"""TensorRT: gated. The tensorrt package comes from NVIDIA's own index and needs a GPU."""
from __future__ import annotations

from lathe.errors import BadInput


def require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise BadInput("TensorRT export needs the tensorrt package and an NVIDIA GPU: "
                       "pip install tensorrt --extra-index-url https://pypi.nvidia.com") from None
    import torch
    if not torch.cuda.is_available():
        raise BadInput("TensorRT export needs an NVIDIA GPU; none is visible (torch.cuda.is_available() is False)")
    raise BadInput("TensorRT engine building is not implemented yet in this lathe version")
