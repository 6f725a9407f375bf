"""lathe.kernels: the `torch.ops.lathe.*` ops, their references, and the dispatcher.

Importing this registers the ops. It never initialises CUDA and never needs a GPU.
"""
from lathe.kernels import conv_chain, conv_ops, ops  # noqa: F401  (registers torch.ops.lathe.*)
from lathe.kernels.dispatch import backend_for, use_backend

__all__ = ["backend_for", "use_backend", "ops"]
