"""lathe.compress: configs and their registry, recipes, calibration, quantize passes, formats,
quantized modules and checkpoints."""
from lathe.compress.config import Int8Config
from lathe.compress.quantize import quantize

__all__ = ["Int8Config", "quantize"]
