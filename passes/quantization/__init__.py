"""Quantization passes: calibrate -> insert quantize/dequantize -> lower to integer ops.

- ``config.py``: the ``quantize=`` option as data (:func:`plan_precisions`), shared by every
  quantization scheme.
- ``calibrate.py``: activation ranges from the float graph on sample inputs (minmax,
  percentile, entropy, mse).
- ``insert.py`` (pass ``quantize``): int8 nodes get quantize/dequantize pairs around them;
  other precisions go to the handlers named in ``config.HANDLERS``.
- ``lower.py`` (pass ``lower-quantized``): dequantize -> op -> quantize patterns become
  qdense / qconv2d / qmatmul with int8 weights folded at compile time.
"""

from __future__ import annotations

from passes.quantization.config import (
    HANDLERS,
    PRECISIONS,
    PrecisionSpec,
    QuantConfig,
    QuantConfigError,
    parse_config,
    plan_precisions,
)

__all__ = ["HANDLERS", "PRECISIONS", "PrecisionSpec", "QuantConfig", "QuantConfigError",
           "parse_config", "plan_precisions"]
