"""Fixtures shared by the quantizer tests, which compare against bitsandbytes."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    """bnb's CPU dequantize falls back to a torch.compile'd function at blocksize >= 2048;
    compiling it would cost these tests seconds per shape. Eager gives the same values."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture
def bnb_dequantize():
    """bitsandbytes' dequantize_4bit, asked for the flat tensor and reshaped.

    Its AVX-512 CPU kernel (0.50.2) takes the absmax of row r, column c from
    absmax[r * (cols // blocksize) + c // blocksize]: wrong when a row's length is not a
    multiple of the blocksize (e.g. 7 x 96 at blocksize 64). On one flat row it is exact;
    its pure-PyTorch backend gives the same values.
    """
    BF = pytest.importorskip("bitsandbytes.functional")

    def dequantize(packed: torch.Tensor, qs) -> torch.Tensor:
        flat = BF.QuantState(absmax=qs.absmax, shape=torch.Size([qs.shape.numel()]), code=qs.code,
                             blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype,
                             offset=qs.offset, state2=qs.state2)
        return BF.dequantize_4bit(packed, flat, quant_type=qs.quant_type).reshape(qs.shape)

    return dequantize
