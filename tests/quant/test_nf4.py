"""NF4 from scratch against bitsandbytes 0.50 (the oracle, run on CPU) and closed-form maths."""

from __future__ import annotations

import math

import pytest
import torch

BF = pytest.importorskip("bitsandbytes.functional")

from lorabook.quant import (  # noqa: E402
    ALLOWED_BLOCKSIZES,
    QuantState,
    bits_per_parameter,
    blockwise_scale,
    dequantize_nf4,
    nearest_code,
    nf4_codebook,
    pack_4bit,
    quantize_nf4,
    unpack_4bit,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd lengths, sizes that are not a multiple of the blocksize, rows shorter than a block
SHAPES = [(37, 129), (4097,), (7, 96), (2, 5, 64)]




def test_codebook_is_bitsandbytes_table():
    ours = nf4_codebook()
    theirs = BF.get_4bit_type("nf4", device="cpu")
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert torch.equal(ours, theirs)  # the same fp32 values, so the same midpoints


def test_codebook_structure_comes_from_quantiles():
    code = nf4_codebook()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])
    assert code[0] == -1 and code[-1] == 1 and code[7] == 0  # exact zero at index 7
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7  # asymmetric
    # the largest positive quantile, normalised, is the top code: a different offset moves it
    other = nf4_codebook(offset=0.99)
    assert not torch.allclose(other, code, atol=1e-3)
    p = torch.tensor(0.9677083, dtype=torch.float32).double()
    ratio = torch.special.ndtri(torch.tensor(0.5 + (0.9677083 - 0.5) * 7 / 8).double())
    assert code[14].item() == pytest.approx((ratio / torch.special.ndtri(p)).item(), abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_byte_exact_with_bitsandbytes(shape, blocksize, dtype, bnb_dequantize):
    torch.manual_seed(blocksize + len(shape))
    W = (torch.randn(shape) * 0.05).to(dtype)
    packed, state = quantize_nf4(W, blocksize)
    bpacked, bstate = BF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
    n = W.numel()
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(packed, bpacked)
    assert state.absmax.dtype == torch.float32 and torch.equal(state.absmax, bstate.absmax)
    out = dequantize_nf4(packed, state)
    assert out.dtype == dtype and out.shape == W.shape
    assert torch.equal(out, bnb_dequantize(bpacked, bstate))
    if shape[-1] % blocksize == 0:  # where bitsandbytes' own 2-D call is right, compare it too
        theirs = BF.dequantize_4bit(bpacked, bstate, quant_type="nf4")
        assert torch.equal(out.reshape(-1), theirs.reshape(-1))


@pytest.mark.parametrize("shape,dtype", [((512, 1031), torch.float32),
                                         ((2049, 2049), torch.bfloat16)], ids=str)
def test_byte_exact_on_a_large_weight(shape, dtype, bnb_dequantize):
    # large enough for the table-driven nearest code, and (bf16) for dequantizing in slabs
    torch.manual_seed(1)
    W = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = quantize_nf4(W, 64)
    bpacked, bstate = BF.quantize_4bit(W, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, bpacked) and torch.equal(state.absmax, bstate.absmax)
    assert torch.equal(dequantize_nf4(packed, state), bnb_dequantize(bpacked, bstate))


def test_fast_nearest_code_equals_bucketize_on_edge_values():
    code = nf4_codebook()
    mids = (code[:-1] + code[1:]) / 2
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    edges = torch.cat([mids, mids.nextafter(up), mids.nextafter(down), code,
                       code.nextafter(up), code.nextafter(down),
                       torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1.0000001, -1.0000001])])
    torch.manual_seed(0)
    x = torch.cat([edges, torch.rand(1 << 18) * 2 - 1])  # (n,) enough for the fast path
    expected = torch.bucketize(x, mids).to(torch.uint8)
    assert torch.equal(nearest_code(x, code), expected)
    assert torch.equal(nearest_code(x[:1000], code), expected[:1000])  # plain bucketize path
    x2 = x[: (x.numel() // 2) * 2].view(2, -1)  # any shape
    assert torch.equal(nearest_code(x2, code), expected[: x2.numel()].view(2, -1))


def test_nearest_code_is_nearest():
    code = nf4_codebook()
    x = torch.linspace(-1, 1, 10_001)
    idx = nearest_code(x, code).long()
    dist = (x[:, None] - code[None, :]).abs()  # (n, 16)
    assert torch.allclose(dist.gather(1, idx[:, None]).squeeze(1), dist.min(dim=1).values)


def test_blockwise_scale_is_absmax_per_block():
    torch.manual_seed(0)
    W = torch.randn(10, 30)
    scaled, absmax = blockwise_scale(W, 64)
    assert absmax.shape == (5,) and scaled.shape == (300,)
    blocks = torch.cat([W.reshape(-1), W.new_zeros(20)]).view(5, 64)
    assert torch.equal(absmax, blocks.abs().amax(dim=1))
    assert scaled.abs().max() <= 1 + 1e-6
    assert torch.allclose(scaled.view(-1)[:300], (blocks / absmax[:, None]).reshape(-1)[:300])


def test_pack_layout_first_element_high_nibble():
    codes = torch.tensor([1, 2, 3, 15, 0], dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.shape == (3, 1)
    assert packed.view(-1).tolist() == [0x12, 0x3F, 0x00]
    assert torch.equal(unpack_4bit(packed, 5), codes)


def test_dequantize_error_is_at_most_half_a_gap():
    torch.manual_seed(0)
    W = torch.randn(33, 65)
    packed, state = quantize_nf4(W, 64)
    out = dequantize_nf4(packed, state)
    gaps = (nf4_codebook()[1:] - nf4_codebook()[:-1]).max() / 2
    per_elem_absmax = state.absmax.repeat_interleave(64)[: W.numel()].view_as(W)
    assert torch.all((out - W).abs() <= gaps * per_elem_absmax + 1e-6)
    # the largest element of each block is exact (codes -1 and 1)
    flat, dq = W.reshape(-1), out.reshape(-1)
    pos = torch.stack([flat[i:i + 64].abs().argmax() + i for i in range(0, flat.numel(), 64)])
    assert torch.equal(dq[pos], flat[pos])


@pytest.mark.parametrize("blocksize,mean_abs,mean_rel", [(64, 0.0728, 0.2033), (256, 0.0803, None),
                                                         (4096, 0.0925, None)])
def test_error_anchors_from_bitsandbytes_tests(blocksize, mean_abs, mean_rel):
    torch.manual_seed(0)
    A = torch.randn(1024, 1024)
    out = dequantize_nf4(*quantize_nf4(A, blocksize))
    err = (A - out).abs()
    assert err.mean().item() == pytest.approx(mean_abs, abs=1e-3)
    if mean_rel is not None:
        assert (err / (A.abs() + 1e-8)).mean().item() == pytest.approx(mean_rel, abs=2e-3)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_converts_both_ways(double_quant):
    torch.manual_seed(0)
    W = torch.randn(48, 128, dtype=torch.bfloat16)
    packed, state = quantize_nf4(W, 64, double_quant=double_quant)
    # ours -> bitsandbytes: its dequantize reads our state
    qs = state.to_bnb()
    assert qs.nested == double_quant and qs.quant_type == "nf4"
    theirs = BF.dequantize_4bit(packed, qs, quant_type="nf4")
    assert torch.equal(theirs, dequantize_nf4(packed, state))
    # bitsandbytes -> ours: we read its output
    bpacked, bstate = BF.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                       compress_statistics=double_quant)
    ours = QuantState.from_bnb(bstate)
    assert ours.double_quant == double_quant and ours.shape == W.shape
    theirs = BF.dequantize_4bit(bpacked, bstate, quant_type="nf4")
    assert torch.equal(dequantize_nf4(bpacked, ours), theirs)


def test_bits_per_parameter():
    W = torch.randn(256, 512)
    packed, state = quantize_nf4(W, 64)
    assert bits_per_parameter(state, packed) == pytest.approx(4.5)
    assert bits_per_parameter(state) == pytest.approx(4.5)
    packed, state = quantize_nf4(W, 64, double_quant=True)
    n = W.numel()
    expected = 4 + 8 / 64 + 32 * math.ceil(n / 64 / 256) / n + 32 / n  # + the fp32 offset
    assert bits_per_parameter(state, packed) == pytest.approx(expected)
    assert bits_per_parameter(state) == pytest.approx(4.127, abs=1e-3)


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    for bad in (48, 16, 8192):
        with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64, 128"):
            quantize_nf4(torch.ones(64), blocksize=bad)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.ones(0, 64))
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        W = torch.randn(1000)
        W[517] = bad_value
        with pytest.raises(ValueError, match="NaN or inf"):
            quantize_nf4(W)
    packed, state = quantize_nf4(torch.randn(10, 10))
    with pytest.raises(ValueError, match="needs 50"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_nf4(packed.int(), state)


def test_weight_that_requires_grad():
    W = torch.randn(16, 64, requires_grad=True)
    packed, state = quantize_nf4(W, 64, double_quant=True)
    assert torch.equal(packed, quantize_nf4(W.detach(), 64)[0])
    assert not dequantize_nf4(packed, state).requires_grad


def test_all_zero_block_matches_bitsandbytes():
    W = torch.zeros(3, 64)
    W[1] = torch.randn(64)
    packed, state = quantize_nf4(W, 64)
    bpacked, bstate = BF.quantize_4bit(W, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, bpacked) and torch.equal(state.absmax, bstate.absmax)
    assert torch.equal(dequantize_nf4(packed, state)[0], torch.zeros(64))
