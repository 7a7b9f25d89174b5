"""FP4 against bitsandbytes' fp4, symmetric Int4 against closed-form rounding."""

from __future__ import annotations

import pytest
import torch

BF = pytest.importorskip("bitsandbytes.functional")

from lorabook.quant import (  # noqa: E402
    codebook,
    dequantize_4bit,
    fp4_codebook,
    int4_codebook,
    quantize_4bit,
)


def test_fp4_codebook_is_bitsandbytes_fp4():
    ours = fp4_codebook()
    assert torch.equal(ours, BF.get_4bit_type("fp4", device="cpu"))
    assert ours.abs().max() == 1 and ours[0] == 0 and ours[8] == 0  # +0 and "-0"
    # E2M1 magnitudes before normalisation: 0, 1/16, then (1 + m/2) * 2^(4 - e)
    assert sorted((ours[:8] * 12).tolist()) == [0, 0.0625, 2, 3, 4, 6, 8, 12]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(37, 129), (4097,), (7, 96)], ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
def test_fp4_byte_exact(shape, blocksize, dtype, double_quant, bnb_dequantize):
    torch.manual_seed(blocksize)
    W = torch.randn(shape).to(dtype)
    packed, state = quantize_4bit(W, "fp4", blocksize, double_quant)
    bpacked, bstate = BF.quantize_4bit(W, blocksize=blocksize, quant_type="fp4",
                                       compress_statistics=double_quant)
    assert torch.equal(packed, bpacked) and torch.equal(state.absmax, bstate.absmax)
    out = dequantize_4bit(packed, state)
    assert out.dtype == dtype and torch.equal(out, bnb_dequantize(bpacked, bstate))
    assert torch.equal(bnb_dequantize(packed, state.to_bnb()), out)  # bnb reads our state


def test_fp4_large_weight_byte_exact():
    torch.manual_seed(0)
    W = torch.randn(256, 2048)  # takes the table-driven nearest-code path
    packed, state = quantize_4bit(W, "fp4", 64)
    bpacked, bstate = BF.quantize_4bit(W, blocksize=64, quant_type="fp4")
    assert torch.equal(packed, bpacked)
    expected = BF.dequantize_4bit(bpacked, bstate, quant_type="fp4")
    assert torch.equal(dequantize_4bit(packed, state), expected)


def test_int4_closed_form():
    torch.manual_seed(0)
    W = torch.randn(100, 130)
    packed, state = quantize_4bit(W, "int4", 64)
    out = dequantize_4bit(packed, state)
    absmax = state.absmax.repeat_interleave(64)[: W.numel()].view_as(W)
    t = W / absmax * 7  # in [-7, 7]
    expected = torch.round(t) / 7 * absmax  # nearest of the 15 levels k / 7
    near_tie = ((t - t.floor()) - 0.5).abs() < 1e-4
    assert near_tie.sum() < 10
    assert torch.allclose(out[~near_tie], expected[~near_tie], rtol=0, atol=1e-6)
    assert torch.all((out - W).abs() <= absmax / 14 + 1e-6)
    levels = torch.round(out / absmax * 7)
    assert levels.min() >= -7 and levels.max() <= 7
    assert len(int4_codebook()) == 16 and int4_codebook()[7] == 0


def test_error_anchor_fp4_and_ordering():
    torch.manual_seed(0)
    A = torch.randn(1024, 1024)
    errors = {}
    for qt in ("nf4", "fp4", "int4"):
        errors[qt] = (dequantize_4bit(*quantize_4bit(A, qt, 64)) - A).abs().mean().item()
    assert errors["fp4"] == pytest.approx(0.0965, abs=1e-3)  # bitsandbytes' own test value
    assert errors["nf4"] < errors["int4"] < errors["fp4"]  # on N(0, 1) at blocksize 64


def test_format_errors():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantize_4bit(torch.randn(64), "nf8")
    with pytest.raises(ValueError, match="quant_type must be one of"):
        codebook("e3m0")
    packed, state = quantize_4bit(torch.randn(64), "int4")
    with pytest.raises(ValueError, match="no 4-bit format 'int4'"):
        state.to_bnb()
