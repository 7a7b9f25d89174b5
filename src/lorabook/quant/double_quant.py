"""Double quantization: the fp32 absmax of each block, themselves stored in 8 bits (chapter 5).

QLoRA subtracts the mean of the absmax (the ``offset``) and quantizes the result blockwise
(blocksize 256) with bitsandbytes' signed *dynamic* 8-bit map. At blocksize 64 this stores
8/64 + 32/(64 * 256) = 0.127 bit per weight for the statistics instead of 32/64 = 0.5.

Rounding rule. bitsandbytes' CPU kernel (``quantize_cpu_impl`` in ``csrc/cpu_ops.cpp``,
0.50) does not search the nearest code. It maps each normalised value v to one of 65,536
evenly spaced bins, ``i = trunc(fma((v + 1) * 0.5, 65535, 0.5))``, and reads the code from a
table built once per codebook: bin i holds the number of code midpoints below
``2 * i / 65535 - 1``. Near zero the dynamic map's codes are closer together than a bin
(1e-6 vs 3e-5), so the result differs from nearest rounding there and at near-ties; a plain
midpoint search disagrees on ~0.2 % of the absmax codes of a Gaussian weight. We reproduce
the table, so the codes are byte-exact with bitsandbytes on CPU. Its CUDA kernel
(``dQuantize`` in ``csrc/kernels.cu``) instead runs a 7-step binary search over the codebook and
then picks the nearer neighbour by midpoint; on a CUDA tensor we run that same search,
vectorised, so each device matches bitsandbytes' kernel for that device.
"""

from __future__ import annotations

import torch

from lorabook.quant.state import DoubleQuantState, cached_table

DQ_BLOCKSIZE = 256  # absmax values per second-level block, as in QLoRA and bitsandbytes
_LUT_BINS = 65536  # bins of bitsandbytes' CPU lookup table over [-1, 1]


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed dynamic 8-bit map, as bitsandbytes' create_dynamic_map (chapter 5).

    For each decade 10^(i-6), i = 0..6, it holds the 2^i midpoints of a linear grid of 2^i + 1
    points in [0.1, 1] (positive and negative), then 0 and 1: 2 * 127 + 2 = 256 sorted values.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        grid = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)  # (2^i + 1,)
        means = (grid[:-1] + grid[1:]) / 2.0  # (2^i,)
        scale = 10 ** (i - 6)
        parts += [scale * means, -scale * means]
    return torch.cat(parts).sort().values.to(device)  # (256,)


def _bnb_cpu_lut(codebook: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU table: for each of 65,536 bins, the code chosen for it (chapter 5)."""
    mids = (codebook[:-1] + codebook[1:]) * 0.5  # (255,)
    i = torch.arange(_LUT_BINS, dtype=torch.float32, device=codebook.device)
    bin_value = (i + i) / float(_LUT_BINS - 1) - 1.0  # (65536,) in [-1, 1], fp32 as in C
    return torch.bucketize(bin_value, mids).to(torch.uint8)  # number of midpoints < value


def _bnb_cuda_search(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA rounding: binary search from code 127, then the nearer neighbour (chapter 5)."""
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = codebook[pivot]
    step = 64
    while step > 0:  # 7 steps over all elements at once: no loop over blocks
        right = x > val
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, val, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = codebook[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, codebook[255], upper)
    lower = torch.where(lower_pivot == 0, codebook[0], lower)
    right = x > val
    up = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(right, up, down).to(torch.uint8)


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE, codebook: torch.Tensor | None = None
) -> tuple[torch.Tensor, DoubleQuantState]:
    """Blockwise absmax 8-bit quantization, byte-exact with bitsandbytes on CPU (chapter 5)."""
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    if x.numel() == 0 or blocksize <= 0:
        raise ValueError(f"expected a non-empty tensor and a positive blocksize, got "
                         f"{x.numel()} elements and blocksize {blocksize}")
    codebook = dynamic_map(x.device) if codebook is None else codebook
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    if n_blocks * blocksize != n:  # zero padding changes neither absmax nor the kept codes
        flat = torch.cat([flat, flat.new_zeros(n_blocks * blocksize - n)])
    blocks = flat.view(n_blocks, blocksize)  # (n_blocks2, 256)
    absmax = torch.linalg.vector_norm(blocks, ord=float("inf"), dim=1)  # (n_blocks2,)
    scaled = (blocks * (1.0 / absmax)[:, None]).clamp_(-1.0, 1.0)
    if x.is_cuda:  # bitsandbytes' CUDA kernel searches the codebook (an all-zero block's NaN -> code 0)
        codes = _bnb_cuda_search(blocks * (1.0 / absmax)[:, None], codebook)
        return codes.reshape(-1)[:n], DoubleQuantState(absmax, codebook, blocksize)
    half = (scaled + 1.0) * 0.5  # fp32, as the C code
    # fma(half, 65535, 0.5) rounds once: the product is exact in float64, the sum too.
    bins = (half.double() * float(_LUT_BINS - 1) + 0.5).float()
    # An all-zero block gives 0 * (1 / 0) = NaN here; the C code writes code 0 for it.
    bins = torch.nan_to_num_(bins, nan=0.0).to(torch.int64)
    codes = cached_table("bnb-cpu-lut", codebook, lambda: _bnb_cpu_lut(codebook))[bins]  # (n_blocks2, 256) uint8
    return codes.reshape(-1)[:n], DoubleQuantState(absmax, codebook, blocksize)


def dequantize_blockwise_8bit(codes: torch.Tensor, state: DoubleQuantState) -> torch.Tensor:
    """Inverse of quantize_blockwise_8bit: codebook[code] * absmax of its block (chapter 5)."""
    values = state.codebook[codes.long()]  # (n,) fp32
    n = values.numel()
    n_blocks = state.absmax.numel()
    pad = n_blocks * state.blocksize - n
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    return (values.view(n_blocks, state.blocksize) * state.absmax[:, None]).reshape(-1)[:n]


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DoubleQuantState]:
    """Quantize the fp32 absmax to 8 bits: (codes, offset, second-level state) (chapter 5)."""
    offset = absmax.mean()  # () fp32
    codes, state2 = quantize_blockwise_8bit(absmax - offset, DQ_BLOCKSIZE)
    return codes, offset, state2
