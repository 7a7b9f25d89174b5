"""Other 4-bit formats built with the same machinery, for comparison with NF4 (chapter 5).

- FP4 (E2M1), bitsandbytes' ``fp4``: a sign bit, 2 exponent bits and 1 mantissa bit, stored
  in bitsandbytes' bit order (not sorted), normalised by its largest magnitude, 12.
- Int4, symmetric: 15 evenly spaced levels k / 7, k = -7..7 (absmax maps to +-7, 0 is exact).

Only the codebook changes: blockwise absmax, nearest code by midpoints and packing are NF4's.
"""

from __future__ import annotations

import torch

from lorabook.quant.nf4 import check_input, dequantize_4bit, nf4_codebook, quantize_with_codebook
from lorabook.quant.state import QUANT_TYPES, QuantState

__all__ = ["codebook", "dequantize_4bit", "fp4_codebook", "int4_codebook", "quantize_4bit"]


def fp4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1) in code order: sign | exponent (2 bits) | mantissa (chapter 5).

    With exponent field e and mantissa bit m, the magnitude is m / 16 when e = 0 (subnormal)
    and (1 + m / 2) * 2^(4 - e) otherwise (bitsandbytes' exponent order); then / 12.
    """
    code = torch.arange(16)
    sign, e, m = code >> 3, (code >> 1) & 0b11, code & 1
    magnitude = torch.where(e == 0, m / 16.0, (1.0 + m / 2.0) * 2.0 ** (4 - e))  # fp32, exact
    values = torch.where(sign == 1, -magnitude, magnitude) + 0.0  # + 0.0 turns -0 into 0
    return (values / values.abs().max()).to(device)  # (16,)


def int4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """Symmetric Int4: code i holds (i - 7) / 7; code 15 repeats 1.0, never chosen (chapter 5)."""
    levels = torch.arange(-7, 8, dtype=torch.float32) / 7  # (15,)
    return torch.cat([levels, torch.ones(1)]).to(device)  # (16,) sorted


def codebook(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 values of a 4-bit format: "nf4", "fp4" or "int4" (chapter 5)."""
    if quant_type == "nf4":
        return nf4_codebook(device=device)
    if quant_type == "fp4":
        return fp4_codebook(device)
    if quant_type == "int4":
        return int4_codebook(device)
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def quantize_4bit(
    W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, QuantState]:
    """Quantize W to a 4-bit format ("nf4", "fp4" or "int4"): (packed, QuantState) (chapter 5)."""
    check_input(W, blocksize)
    return quantize_with_codebook(W, codebook(quant_type, W.device), blocksize, double_quant,
                                  quant_type)
