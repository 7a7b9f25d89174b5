"""NF4 from scratch: codebook, blockwise absmax, nearest code by midpoints, packing (chapter 5).

The steps, each a few tensor operations over the whole weight (no Python loop over blocks):

1. flatten W row-major and cut it into blocks of ``blocksize`` values;
2. absmax per block (fp32), scale the block by 1 / absmax into [-1, 1];
3. nearest of the 16 code values, by ``torch.bucketize`` on the 15 midpoints (large CPU
   tensors take a table lookup on the float's top 16 bits that gives the same codes);
4. pack two 4-bit codes per byte, the first element in the high nibble: shape ((n + 1) // 2, 1).

Dequantizing reads ``codebook[code] * absmax`` in fp32 and casts to the original dtype. Every
step follows bitsandbytes 0.50 (its pure-PyTorch backend quantizes, its CPU kernel
dequantizes), so packed bytes, absmax and the dequantized tensor are identical to its own.
"""

from __future__ import annotations

import sys

import torch

from lorabook.quant.double_quant import double_quantize
from lorabook.quant.state import QuantState, cached_table

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit blocksizes
NF4_OFFSET = 0.9677083  # outermost quantile, mean of 1 - 1/30 and 1 - 1/32 (bitsandbytes)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def nf4_codebook(offset: float = NF4_OFFSET,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values, derived from quantiles of N(0, 1) and normalised to [-1, 1] (chapter 5).

    8 positive values at the quantiles linspace(offset, 0.5, 9)[:-1], 7 negative ones at
    linspace(offset, 0.5, 8)[:-1], and an exact 0; sorted, divided by the largest. The
    probabilities are fp32 (as in bitsandbytes), the inverse CDF is evaluated in fp64.
    """
    p_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double()  # (8,)
    p_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double()  # (7,)
    values = torch.cat([torch.special.ndtri(p_pos), torch.zeros(1, dtype=torch.float64),
                        -torch.special.ndtri(p_neg)]).float()  # (16,)
    values = values.sort().values
    return (values / values.max()).to(device)


def check_input(W: torch.Tensor, blocksize: int) -> None:
    """TypeError/ValueError unless W is a non-empty float tensor, blocksize allowed (chapter 5)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in FLOAT_DTYPES:
        raise TypeError(f"expected a float32, float16 or bfloat16 tensor, got {W.dtype}")
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}, got {blocksize!r}")
    if W.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(W.shape)})")


def _check_finite(absmax: torch.Tensor) -> None:
    # A NaN or inf anywhere in W shows up in its block's absmax: one check on the small tensor.
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("cannot quantize a tensor that contains NaN or inf")


def blockwise_scale(W: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax per block and W scaled into [-1, 1] block by block: (scaled, absmax) (chapter 5).

    ``scaled`` is fp32 of length n rounded up to even (a zero pads an odd length), ``absmax``
    fp32 of length ceil(n / blocksize). A full block is multiplied by 1 / absmax, the last
    partial block divided by its absmax, exactly as bitsandbytes does.
    """
    flat = W.reshape(-1)  # (n,) a view when W is contiguous; fp16/bf16 upcast inside the ops
    n = flat.numel()
    n_full = n // blocksize
    full = n_full * blocksize
    scaled = torch.empty(n + n % 2, dtype=torch.float32, device=W.device)  # (n_even,)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=W.device)  # (n_blocks,)
    if n_full:
        blocks = flat[:full].view(n_full, blocksize)  # (n_full, blocksize)
        # max |x| = max(max x, -min x): two reductions, no |W| copy; + 0.0 turns -0 into 0.
        absmax[:n_full] = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg()).float() + 0.0
        inv = 1.0 / absmax[:n_full].clamp(min=1e-38)  # (n_full,)
        torch.mul(blocks, inv[:, None], out=scaled[:full].view(n_full, blocksize))
    if full < n:
        tail = flat[full:].float()  # (n - full,)
        am = tail.abs().max().clamp(min=1e-38)  # ()
        absmax[n_full] = am
        torch.div(tail, am, out=scaled[full:n])
    if n % 2:
        scaled[n] = 0.0
    return scaled, absmax


def _sorted_midpoints(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(codebook, stable=True)  # identity for NF4 and Int4
    ordered = codebook[order]
    return (ordered[:-1] + ordered[1:]) / 2, order  # (15,), (16,)


def nearest_code(scaled: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code for each value, by bucketize on the midpoints: uint8 (chapter 5).

    ``codebook`` need not be sorted (FP4 is stored in bit order). A value exactly on a
    midpoint goes to the lower code. No clamp is needed: the outermost codes are -1 and 1,
    so values a rounding error beyond them land there anyway.
    """
    midpoints, order = _sorted_midpoints(codebook)
    if (scaled.numel() >= _FAST_MIN_NUMEL and scaled.dtype == torch.float32
            and scaled.device.type == "cpu" and scaled.is_contiguous() and _LITTLE_ENDIAN):
        return _nearest_code_by_bits(scaled.reshape(-1), midpoints, order).view(scaled.shape)
    idx = torch.bucketize(scaled, midpoints, out_int32=True)  # (n,) int32 in [0, 15]
    return order.to(torch.uint8)[idx]


# The same answer, faster on large tensors. The top 16 bits of a float32 (sign, exponent,
# 7 mantissa bits) name an interval of floats; for each of the 65,536 intervals a table holds
# the number of midpoints below it. An interval that contains a midpoint (about 1 % of
# Gaussian weights fall in one) is marked and those values go through bucketize.
_FAST_MIN_NUMEL = 1 << 18  # below this, building the table costs more than it saves
_AMBIGUOUS = 255
_KEY_SPAN = 0x3F81  # top-16-bit keys of the floats in [0, 1.0078)
_LITTLE_ENDIAN = sys.byteorder == "little"  # the high half of a float32 is its second uint16


def _bits_table(midpoints: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    # Keys 0..0x3F80 hold every float in [0, 1.0078), keys 0x8000..0xBF80 their negatives;
    # scaled values never reach the others, which are marked to go through bucketize.
    first = (torch.arange(_KEY_SPAN, dtype=torch.int32, device=midpoints.device) << 16)
    last = (first | 0xFFFF).view(torch.float32)  # (16257,) largest float of each interval
    first = first.view(torch.float32)  # smallest
    gap = torch.full((0x8000 - _KEY_SPAN,), _AMBIGUOUS, dtype=torch.uint8, device=midpoints.device)
    halves = []
    for lo, hi in ((first, last), (-last, -first)):  # sign bit 0, then 1
        below = torch.bucketize(lo, midpoints)  # midpoints < every float of the interval
        inside = torch.bucketize(hi, midpoints, right=True) - below  # midpoints within it
        halves += [torch.where(inside > 0, _AMBIGUOUS, order[below]).to(torch.uint8), gap]
    return torch.cat(halves)  # (65536,)


def _nearest_code_by_bits(scaled: torch.Tensor, midpoints: torch.Tensor,
                          order: torch.Tensor) -> torch.Tensor:
    key = scaled.view(torch.uint16)[1::2].to(torch.int32)  # top 16 bits (little-endian)
    ident = torch.cat([midpoints, order.to(midpoints.dtype)])  # the order matters too (FP4)
    table = cached_table("4bit-bits", ident, lambda: _bits_table(midpoints, order))
    codes = table.index_select(0, key)  # (n,) uint8
    todo = (codes == _AMBIGUOUS).nonzero().squeeze(1)
    codes[todo] = order.to(torch.uint8)[torch.bucketize(scaled[todo], midpoints)]
    return codes


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble: ((n + 1) // 2, 1) (chapter 5)."""
    codes = codes.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = codes[0::2] << 4  # (n_even / 2,)
    return packed.bitwise_or_(codes[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """The 4-bit codes of a packed tensor, high nibble first, as uint8 of length n (chapter 5)."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)  # (2 * bytes,)
    return codes if n is None else codes[:n]


@torch.no_grad()
def quantize_with_codebook(
    W: torch.Tensor, codebook: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
    quant_type: str = "nf4",
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise absmax 4-bit quantization of W with a 16-value codebook in [-1, 1] (chapter 5)."""
    check_input(W, blocksize)
    if codebook.numel() != 16:
        raise ValueError(f"expected a codebook of 16 values, got {codebook.numel()}")
    codebook = codebook.to(device=W.device, dtype=torch.float32)
    scaled, absmax = blockwise_scale(W, blocksize)
    _check_finite(absmax)
    packed = pack_4bit(nearest_code(scaled, codebook))  # ((n + 1) // 2, 1) uint8
    state = QuantState(absmax=absmax, shape=W.shape, dtype=W.dtype, blocksize=blocksize,
                       codebook=codebook, quant_type=quant_type)
    if double_quant:
        state.absmax, state.offset, state.state2 = double_quantize(absmax)
    return packed, state


def _pair_table(codebook: torch.Tensor) -> torch.Tensor:
    """For each byte value, its two decoded fp32 values as one int64: (256,) (chapter 5)."""
    byte = torch.arange(256, device=codebook.device)
    pairs = torch.stack([codebook[byte >> 4], codebook[byte & 0xF]], dim=1)  # (256, 2) fp32
    return pairs.contiguous().view(torch.int64).reshape(256)


def decode_codes(packed: torch.Tensor, codebook: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """codebook[code] for every code of a packed tensor, fp32 of length 2 * bytes (chapter 5).

    One gather decodes both nibbles of a byte: an int64 entry of the table is two fp32 values.
    """
    index = packed.reshape(-1).to(torch.int32)  # (bytes,)
    table = _pair_table(codebook)  # (256,) int64
    if out is None:
        return table.index_select(0, index).view(torch.float32)
    torch.index_select(table, 0, index, out=out.view(torch.int64))
    return out


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                  out: torch.Tensor) -> None:
    # out = values * absmax of their block, values starting on a block boundary; the product
    # is fp32 and rounds once to out's dtype (as bitsandbytes).
    m = out.numel()
    k = m // blocksize
    full = k * blocksize
    torch.mul(values[:full].view(k, blocksize), absmax[:k, None], out=out[:full].view(k, blocksize))
    if full < m:
        torch.mul(values[full:m], absmax[k], out=out[full:m])


_SLAB = 1 << 22  # values decoded at a time for fp16/bf16 output: a 16 MB fp32 buffer


@torch.no_grad()
def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """W from packed codes and state: codebook[code] * absmax, in the state's dtype (chapter 5).

    ``dtype`` overrides the output dtype (the product is still formed in fp32).
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"expected packed codes as uint8, got {packed.dtype}")
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes; a tensor of shape "
                         f"{tuple(state.shape)} needs {(n + 1) // 2}")
    dtype = state.dtype if dtype is None else dtype
    absmax = state.absmax_fp32()  # (n_blocks,)
    bs = state.blocksize
    if dtype == torch.float32:  # decode into the output itself, then scale it in place
        values = decode_codes(packed, state.codebook)  # (n_even,)
        _scale_blocks(values, absmax, bs, values[:n])
        return values[:n].view(state.shape)
    # fp16/bf16: decode slab by slab into one fp32 buffer and scale into the output, so no
    # full-size fp32 copy is ever made
    out = torch.empty(n, dtype=dtype, device=packed.device)
    flat = packed.reshape(-1)
    buffer = torch.empty(min(_SLAB, n + 1), dtype=torch.float32, device=packed.device)
    for start in range(0, n, _SLAB):  # _SLAB is a multiple of every blocksize
        stop = min(start + _SLAB, n)
        chunk = flat[start // 2:(stop + 1) // 2]
        values = decode_codes(chunk, state.codebook, out=buffer[:2 * chunk.numel()])
        _scale_blocks(values, absmax[start // bs:], bs, out[start:stop])
    return out.view(state.shape)


def quantize_nf4(
    W: torch.Tensor, blocksize: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, QuantState]:
    """Quantize W to NF4: (packed uint8 ((n + 1) // 2, 1), QuantState) (chapter 5)."""
    check_input(W, blocksize)
    return quantize_with_codebook(W, nf4_codebook(device=W.device), blocksize, double_quant, "nf4")


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Inverse of quantize_nf4: the tensor back in its original shape and dtype (chapter 5)."""
    return dequantize_4bit(packed, state)
