"""Quantized modules: plain nn.Modules holding packed tensors as buffers. They save to and load
from state dicts (no pickle) and call only torch.ops.lathe.*. Each lives beside its format in
lathe/compress/formats/<name>.py; this module keeps their names and the registry checkpoints
rebuild them from."""
from lathe.compress.formats import (QUANT_MODULES, QLinearFP8, QLinearW4A16, QLinearW8A8,  # noqa: F401
                                    QLinearW8A16, module_class, register_module)
