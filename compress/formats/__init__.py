"""Quantized weight formats, one file each (see base.py for the protocol). Importing this
package registers them all; their names are re-exported here."""
from lathe.compress.formats.base import (FORMATS, QUANT_MODULES, Format, check_finite, copy_bias,  # noqa: F401
                                         format_of, from_linear_rtn, module_class, quantized_modules,
                                         register_format, register_module, sqnr_db)
from lathe.compress.formats.fp8 import FP8_E4M3_MAX, FP8E4M3, QLinearFP8  # noqa: F401
from lathe.compress.formats.w4a16 import Int4Group, QLinearW4A16  # noqa: F401
from lathe.compress.formats.w8a8 import Int8PerChannel, QLinearW8A8  # noqa: F401
from lathe.compress.formats.w8a16 import Int8WeightOnly, QLinearW8A16  # noqa: F401
