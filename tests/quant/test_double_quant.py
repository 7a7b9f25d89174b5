"""Double quantization against bitsandbytes' compress_statistics=True on CPU."""

from __future__ import annotations

import pytest
import torch

BF = pytest.importorskip("bitsandbytes.functional")

from lorabook.quant import (  # noqa: E402
    dequantize_blockwise_8bit,
    dequantize_nf4,
    dynamic_map,
    quantize_blockwise_8bit,
    quantize_nf4,
)


def test_dynamic_map_is_bitsandbytes_map():
    ours = dynamic_map()
    assert ours.shape == (256,) and torch.all(ours[1:] >= ours[:-1])
    assert torch.equal(ours, BF.create_dynamic_map())


@pytest.mark.parametrize("n", [256, 1000, 4097, 70_000])
def test_blockwise_8bit_is_byte_exact(n):
    torch.manual_seed(n)
    x = torch.randn(n) * torch.rand(n) ** 4  # many values near zero, where the map is dense
    codes, state2 = quantize_blockwise_8bit(x, 256)
    bcodes, bstate = BF.quantize_blockwise(x, blocksize=256)
    assert codes.dtype == torch.uint8 and torch.equal(codes, bcodes)
    assert torch.equal(state2.absmax, bstate.absmax)
    expected = BF.dequantize_blockwise(bcodes, bstate)
    assert torch.equal(dequantize_blockwise_8bit(codes, state2), expected)


def test_bitsandbytes_cpu_rule_is_not_plain_nearest():
    """bnb's CPU kernel reads codes from a 65,536-bin table; plain nearest-midpoint differs."""
    torch.manual_seed(0)
    absmax = BF.quantize_4bit(torch.randn(512, 1024), blocksize=64, quant_type="nf4")[1].absmax
    x = absmax - absmax.mean()  # what double quantization quantizes
    bcodes, bstate = BF.quantize_blockwise(x, blocksize=256)
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) / 2
    blocks = x.view(-1, 256) / bstate.absmax[:, None]
    nearest = torch.bucketize(blocks, mids).to(torch.uint8).reshape(-1)
    differ = (nearest != bcodes).sum().item()
    assert 0 < differ < 0.01 * x.numel()  # a fraction of a percent of the absmax codes
    assert torch.equal(quantize_blockwise_8bit(x)[0], bcodes)  # ours: none


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(300, 257), (64, 64), (5001,)], ids=str)
def test_double_quant_byte_exact(shape, blocksize, dtype):
    torch.manual_seed(blocksize)
    W = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = quantize_nf4(W, blocksize, double_quant=True)
    bpacked, bstate = BF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4",
                                       compress_statistics=True)
    assert state.double_quant and bstate.nested
    assert torch.equal(packed, bpacked)
    assert torch.equal(state.offset, bstate.offset)
    assert state.absmax.dtype == torch.uint8 and torch.equal(state.absmax, bstate.absmax)
    assert torch.equal(state.state2.absmax, bstate.state2.absmax)
    assert state.state2.blocksize == bstate.state2.blocksize == 256
    flat = BF.QuantState(absmax=bstate.absmax, shape=torch.Size([W.numel()]), code=bstate.code,
                         blocksize=blocksize, quant_type="nf4", dtype=dtype,
                         offset=bstate.offset, state2=bstate.state2)
    expected = BF.dequantize_4bit(bpacked, flat, quant_type="nf4").reshape(shape)
    assert torch.equal(dequantize_nf4(packed, state), expected)


def test_double_quant_absmax_close_to_fp32_absmax():
    torch.manual_seed(0)
    W = torch.randn(256, 1024)
    _, plain = quantize_nf4(W, 64)
    _, dq = quantize_nf4(W, 64, double_quant=True)
    restored = dq.absmax_fp32()
    assert restored.shape == plain.absmax.shape
    # 8-bit dynamic codes of (absmax - mean): error well under 1 % of the absmax
    assert ((restored - plain.absmax).abs() / plain.absmax).max() < 0.01


def test_equal_absmax_gives_an_all_zero_block():
    # absmax - offset is 0 everywhere: bnb's kernel writes code 0 for such a block
    W = torch.ones(4, 64) * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    packed, state = quantize_nf4(W, 64, double_quant=True)
    bpacked, bstate = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(state.absmax, bstate.absmax) and torch.equal(packed, bpacked)
    assert torch.equal(dequantize_nf4(packed, state), W)


def test_bad_input():
    with pytest.raises(TypeError):
        quantize_blockwise_8bit(torch.ones(10, dtype=torch.int64))
    with pytest.raises(ValueError):
        quantize_blockwise_8bit(torch.ones(0))


def test_cuda_rounding_rule_is_a_binary_search_for_the_nearest_code():
    """The CUDA path's search (run here on CPU tensors) picks the nearest code; NaN gives code 0."""
    from lorabook.quant.double_quant import _bnb_cuda_search, dynamic_map

    codebook = dynamic_map()
    x = torch.cat([torch.randn(20000).clamp(-1, 1), codebook, torch.tensor([-1.0, 1.0])])
    midpoints = (codebook[:-1] + codebook[1:]) / 2
    assert torch.equal(_bnb_cuda_search(x, codebook), torch.bucketize(x, midpoints).to(torch.uint8))
    assert _bnb_cuda_search(torch.tensor([float("nan")]), codebook).item() == 0
