"""What 4 bits cost: weight error per format and blocksize, and a model stored each way (chapter 5).

Everything is measured from the tensors the formats actually produce:

- ``quantization_error`` / ``error_table``: quantize weights with NF4, FP4 or Int4 at a
  blocksize, dequantize, and compare with the original (mean absolute error, in the weight's
  own units and in units of its standard deviation, so matrices of different scale average);
  ``sample_weights`` takes leading slices of many matrices to keep that quick.
- ``weight_stats`` and ``distinct_per_block``: how Gaussian weights are, and whether they
  already sit on a 4-bit grid (the book's LM went through GGUF Q4_1).
- ``diff_with_bitsandbytes``: differing bytes, absmax and values against bitsandbytes.
- ``model_in_format`` / ``compare_formats``: a copy of a model stored in fp32, bf16, NF4,
  NF4 + double quantization, FP4 or Int4 (its linear layers swapped for ``LinearNF4``), its size
  and bits per weight measured, and any metrics you pass computed on it (perplexity, or
  ``target_loss``: the teacher-forced loss of a task's answers)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorabook.quant.formats import quantize_4bit
from lorabook.quant.linear4bit import LinearNF4, quantize_model, quantized_bytes
from lorabook.quant.nf4 import ALLOWED_BLOCKSIZES, dequantize_4bit
from lorabook.quant.state import QUANT_TYPES, QuantState, bits_per_parameter

# Storage formats compared in chapter 5: name -> (4-bit quant_type, double quantization), or
# None for a plain float dtype.
FORMATS = {
    "fp32": None,
    "bf16": None,
    "nf4": ("nf4", False),
    "nf4+dq": ("nf4", True),
    "fp4": ("fp4", False),
    "int4": ("int4", False),
}
IGNORE_INDEX = -100  # label of a token the loss skips (as lorabook.data)


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}, got {blocksize!r}")


@torch.no_grad()
def quantization_error(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                       double_quant: bool = False) -> dict:
    """Error of one 4-bit round trip of W: mean |W - Q(W)|, also / std(W) and relative (chapter 5).

    Keys: ``mae`` (in W's units), ``mae_over_std`` (mean |error| / std(W): on N(0, 1) data the
    same number, on real weights comparable across matrices), ``rel_fro`` (||W - Q(W)||_F /
    ||W||_F) and ``numel``.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    packed, state = quantize_4bit(W, quant_type, blocksize, double_quant)
    W32 = W.detach().float()
    err = dequantize_4bit(packed, state, torch.float32) - W32  # same shape as W
    mae = err.abs().mean().item()
    std = W32.std().item()
    return {"mae": mae, "mae_over_std": mae / std if std > 0 else float("nan"),
            "rel_fro": (err.norm() / W32.norm()).item(), "numel": W.numel()}


def error_table(weights: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
                quant_types: Iterable[str] = ("nf4", "fp4", "int4"),
                blocksizes: Iterable[int] = ALLOWED_BLOCKSIZES, progress: bool = False) -> list[dict]:
    """Rows (quant_type, blocksize, mae, mae_over_std, rel_fro) over several weights (chapter 5).

    Each number is the mean over the weights weighted by their number of elements, so a table
    over a model's matrices is the error per weight of the whole set. Weights whose sizes are
    multiples of the blocksize are quantized in one call (no block spans two of them, so the
    codes are those of quantizing each alone); the others one by one.
    """
    tensors = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
    if not tensors:
        raise ValueError("error_table needs at least one weight tensor")
    quant_types, blocksizes = list(quant_types), list(blocksizes)
    for bs in blocksizes:
        _check_blocksize(bs)
    flats = [W.detach().reshape(-1).float() for W in tensors]
    sizes = [f.numel() for f in flats]
    stds = torch.stack([f.std() for f in flats])  # (k,)
    norms = torch.stack([f.norm() for f in flats])  # (k,)
    total = sum(sizes)
    rows = []
    grid = [(qt, bs) for qt in quant_types for bs in blocksizes]
    for qt, bs in tqdm(grid, desc="error table", disable=not progress):
        if all(n % bs == 0 for n in sizes):
            joined = torch.cat(flats)  # (total,)
            packed, state = quantize_4bit(joined, qt, bs)
            errs = (dequantize_4bit(packed, state) - joined).split(sizes)
        else:
            errs = [dequantize_4bit(*quantize_4bit(f, qt, bs)) - f for f in flats]
        mae = torch.stack([e.abs().mean() for e in errs])  # (k,)
        fro = torch.stack([e.norm() for e in errs])  # (k,)
        w = torch.tensor(sizes, dtype=torch.float32) / total  # (k,) share of the elements
        rows.append({"quant_type": qt, "blocksize": bs, "mae": float((w * mae).sum()),
                     "mae_over_std": float((w * mae / stds).sum()),
                     "rel_fro": float((w * fro / norms).sum())})
    return rows


def sample_weights(weights: Mapping[str, torch.Tensor], numel: int,
                   multiple: int = 4096) -> dict[str, torch.Tensor]:
    """A leading slice of each flattened weight, together about ``numel`` elements (chapter 5).

    Each slice has a length that is a multiple of ``multiple`` (4096, the largest blocksize), so
    its blocks are exactly the first blocks of the whole matrix at every blocksize; a matrix
    shorter than its share is kept whole.
    """
    if not weights:
        raise ValueError("sample_weights needs at least one weight")
    if numel < 1 or multiple < 1:
        raise ValueError(f"numel and multiple must be >= 1, got {numel} and {multiple}")
    share = max(multiple, numel // len(weights) // multiple * multiple)
    return {name: W.detach().reshape(-1)[:share] for name, W in weights.items()}


def weight_stats(tensors: Iterable[torch.Tensor], blocksize: int = 64) -> dict:
    """How Gaussian a set of matrices looks, each in units of its own std (chapter 5).

    Keys: ``numel``, ``excess_kurtosis`` (0 for a Gaussian, > 0 for heavy tails),
    ``beyond_3_std`` (share of |w| > 3 std; 0.0027 for a Gaussian) and ``block_absmax_std``
    (mean absmax of the blocks of ``blocksize``, in std; 2.60 for N(0, 1) at 64).
    """
    zs = [(W.detach().float() - W.detach().float().mean()).reshape(-1) for W in tensors]
    if not zs:
        raise ValueError("weight_stats needs at least one tensor")
    zs = [z / z.std() for z in zs]
    z = torch.cat(zs)  # (n,) standardised per matrix
    blocks = torch.cat([b[: b.numel() // blocksize * blocksize].view(-1, blocksize) for b in zs])
    return {"numel": z.numel(), "excess_kurtosis": (z**4).mean().item() - 3.0,
            "beyond_3_std": (z.abs() > 3).float().mean().item(),
            "block_absmax_std": blocks.abs().amax(dim=1).mean().item()}


def distinct_per_block(W: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Number of distinct values in each aligned block of ``size`` elements of W (chapter 5).

    A weight de-quantized from a 4-bit format with blocks of ``size`` (GGUF Q4_1: 32) has at
    most 16 per block; a trained float weight has ``size``.
    """
    flat = W.detach().reshape(-1)
    if flat.numel() < size or size < 1:
        raise ValueError(f"expected at least one block of {size} values, got {flat.numel()}")
    blocks = flat[: flat.numel() // size * size].view(-1, size).sort(dim=1).values
    return 1 + (blocks[:, 1:] != blocks[:, :-1]).sum(dim=1)  # (n_blocks,)


@torch.no_grad()
def diff_with_bitsandbytes(W: torch.Tensor, packed: torch.Tensor, state: QuantState) -> dict:
    """How our (packed, state) of W differs from bitsandbytes' quantize_4bit of W (chapter 5).

    bitsandbytes quantizes the same W with the state's quant_type, blocksize and double
    quantization. Keys: ``bytes`` (packed bytes compared), ``differing_bytes``,
    ``differing_absmax`` (fp32 values, or 8-bit codes with double quantization),
    ``differing_offset`` (0 or 1; 0 without DQ) and ``max_abs_dequant_diff`` between our
    ``dequantize_4bit`` and bitsandbytes' dequantize of its own output (asked for the flat
    tensor: its 2-D CPU kernel mis-scales rows whose length is not a multiple of the blocksize).
    """
    import bitsandbytes.functional as BF

    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes has no 4-bit format {state.quant_type!r}; "
                         "compare 'nf4' or 'fp4'")
    if tuple(W.shape) != tuple(state.shape):
        raise ValueError(f"W has shape {tuple(W.shape)}, the state {tuple(state.shape)}")
    bpacked, bstate = BF.quantize_4bit(W, blocksize=state.blocksize, quant_type=state.quant_type,
                                       compress_statistics=state.double_quant)
    flat = BF.QuantState(absmax=bstate.absmax, shape=torch.Size([W.numel()]), code=bstate.code,
                         blocksize=bstate.blocksize, quant_type=bstate.quant_type,
                         dtype=bstate.dtype, offset=bstate.offset, state2=bstate.state2)
    # large blocksizes make bitsandbytes' CPU dequantize compile a function first; eager is the same
    with torch._dynamo.config.patch(disable=True):
        theirs = BF.dequantize_4bit(bpacked, flat, quant_type=state.quant_type)  # (n,)
    ours = dequantize_4bit(packed, state).reshape(-1)
    offset_differs = 0
    if state.double_quant:
        offset_differs = int(not torch.equal(state.offset.reshape(()), bstate.offset.reshape(())))
    return {
        "bytes": packed.numel(),
        "differing_bytes": int((packed.reshape(-1) != bpacked.reshape(-1)).sum()),
        "differing_absmax": int((state.absmax != bstate.absmax).sum()),
        "differing_offset": offset_differs,
        "max_abs_dequant_diff": (ours.float() - theirs.float()).abs().max().item(),
    }


def model_in_format(model: nn.Module, fmt: str, blocksize: int = 64,
                    skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """A copy of ``model`` stored in ``fmt`` (a key of FORMATS); the original is untouched (chapter 5).

    "fp32"/"bf16" cast every tensor; the 4-bit formats swap the linear layers (all but ``skip``)
    for ``LinearNF4`` and leave the rest (embeddings, norms) as they are.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {tuple(FORMATS)}")
    _check_blocksize(blocksize)
    if fmt in ("fp32", "bf16"):
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        return copy.deepcopy(model).to(dtype)
    quant_type, double_quant = FORMATS[fmt]
    return quantize_model(copy.deepcopy(model), blocksize=blocksize, double_quant=double_quant,
                          quant_type=quant_type, skip=skip)


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return name in skip or name.rsplit(".", 1)[-1] in skip


def weight_bits(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> float:
    """Bits stored per weight of the linear layers (all but ``skip``): codes + statistics (chapter 5).

    An ``nn.Linear`` weight counts its dtype's bits; a ``LinearNF4`` its packed codes and per-block
    statistics (``bits_per_parameter``), without the shared codebooks.
    """
    bits, n = 0.0, 0
    for name, module in model.named_modules():
        if _skipped(name, skip):
            continue
        if isinstance(module, LinearNF4):
            k = module.in_features * module.out_features
            bits += bits_per_parameter(module.quant_state, module.weight_packed) * k
        elif isinstance(module, nn.Linear):
            k = module.weight.numel()
            bits += 8 * module.weight.element_size() * k
        else:
            continue
        n += k
    if n == 0:
        raise ValueError("the model has no linear layers outside skip={skip}")
    return bits / n


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def target_loss(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict:
    """Teacher-forced NLL of the supervised tokens (labels != -100), per token (chapter 5).

    ``batches`` are dicts of (B, T) input_ids, attention_mask, labels, as
    ``lorabook.data.collate_causal`` makes them. Returns ``nll`` (nats per target token, a mean
    over all tokens of all batches), ``ppl`` = exp(nll) and ``tokens``.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)  # (B, T)
            mask = batch["attention_mask"].to(device)  # (B, T)
            labels = batch["labels"].to(device)  # (B, T)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            total += nll.item()
            tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no supervised tokens (every label is -100): nothing to score")
    nll = total / tokens
    return {"nll": nll, "ppl": float(torch.tensor(nll).exp()), "tokens": tokens}


def compare_formats(model: nn.Module, metrics: Mapping[str, Callable[[nn.Module], float]],
                    formats: Iterable[str] = tuple(FORMATS), blocksize: int = 64,
                    skip: tuple[str, ...] = ("lm_head",), progress: bool = True) -> list[dict]:
    """One row per format: size, bits per weight, conversion time and each metric (chapter 5).

    Each format is made from ``model`` by ``model_in_format``, measured, and dropped before the
    next, so only one extra copy exists at a time. Row keys: ``format``, ``weight_bits`` (linear
    layers), ``model_bytes`` (every parameter and buffer, shared tensors once), ``convert_s``
    (copy + quantize), ``metrics``' names, and ``metrics_s`` (time to compute them all).
    """
    formats = list(formats)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {tuple(FORMATS)}")
    rows = []
    for fmt in tqdm(formats, desc="formats", disable=not progress):
        start = time.perf_counter()
        copy_ = model_in_format(model, fmt, blocksize, skip)
        row = {"format": fmt, "weight_bits": weight_bits(copy_, skip),
               "model_bytes": quantized_bytes(copy_), "convert_s": time.perf_counter() - start}
        start = time.perf_counter()
        for name, fn in metrics.items():
            row[name] = fn(copy_)
        row["metrics_s"] = time.perf_counter() - start
        rows.append(row)
        del copy_
    return rows
