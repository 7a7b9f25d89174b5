"""NF4 and QLoRA's 4-bit storage, built from scratch in plain PyTorch (chapter 5).

Byte-exact with bitsandbytes 0.50: same packed codes, absmax and dequantized tensors.

- ``nf4``: codebook from normal quantiles, blockwise absmax, nearest code, packing.
- ``double_quant``: the absmax stored in 8 bits (dynamic map, blocksize 256).
- ``formats``: FP4 and symmetric Int4 with the same machinery, ``quantize_4bit``.
- ``state``: ``QuantState`` (to and from bitsandbytes) and ``bits_per_parameter``.
- ``linear4bit``: ``LinearNF4``, ``quantize_model`` and ``dense_weights`` (generation, held-out
  scores).
"""

from lorabook.quant.double_quant import (
    dequantize_blockwise_8bit,
    double_quantize,
    dynamic_map,
    quantize_blockwise_8bit,
)
from lorabook.quant.formats import codebook, fp4_codebook, int4_codebook, quantize_4bit
from lorabook.quant.linear4bit import LinearNF4, dense_weights, quantize_model, quantized_bytes
from lorabook.quant.nf4 import (
    ALLOWED_BLOCKSIZES,
    blockwise_scale,
    decode_codes,
    dequantize_4bit,
    dequantize_nf4,
    nearest_code,
    nf4_codebook,
    pack_4bit,
    quantize_nf4,
    quantize_with_codebook,
    unpack_4bit,
)
from lorabook.quant.state import QUANT_TYPES, DoubleQuantState, QuantState, bits_per_parameter

__all__ = [
    "ALLOWED_BLOCKSIZES",
    "QUANT_TYPES",
    "DoubleQuantState",
    "LinearNF4",
    "dense_weights",
    "QuantState",
    "bits_per_parameter",
    "blockwise_scale",
    "codebook",
    "decode_codes",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dequantize_nf4",
    "double_quantize",
    "dynamic_map",
    "fp4_codebook",
    "int4_codebook",
    "nearest_code",
    "nf4_codebook",
    "pack_4bit",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "quantize_model",
    "quantize_nf4",
    "quantize_with_codebook",
    "quantized_bytes",
    "unpack_4bit",
]
