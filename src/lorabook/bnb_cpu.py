"""bitsandbytes' CPU inference repacking, and how the cross-check stays off it (chapter 6).

On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` rewrites its weight the
first time it runs in eval mode on an input that needs no gradient
(``_convert_weight_packed_for_cpu``): the codes are re-laid out in tiles for a fused bf16 kernel,
the double-quantized absmax is expanded and rounded to bf16, and the QuantState is marked
``packing_format_for_cpu``. The change is in place and stays. From then on:

- the layer computes in bf16 whatever ``compute_dtype`` says (``gemv_4bit`` casts its input);
- in training mode too, forward still goes through ``gemv_4bit``, which has no autograd kernel:
  PyTorch warns, and no gradient reaches the layer's input, so the adapters of every earlier
  layer get wrong gradients;
- ``bitsandbytes.functional.dequantize_4bit(weight.data, quant_state)`` reads the re-laid-out
  codes as if they were canonical, and returns a wrong weight; peft's ``merge_and_unload()``
  builds its merged 4-bit weight from that.

``repacking_repro`` measures all three on one small layer; ``keep_canonical`` undoes the
repacking and turns it off, so that bitsandbytes computes in the compute dtype, with autograd,
on the bytes it stored.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def _linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def is_repacked(layer: nn.Module) -> bool:
    """True when bitsandbytes has re-laid-out this Linear4bit for its CPU kernel (chapter 6)."""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_canonical(model: nn.Module) -> int:
    """Undo and switch off bitsandbytes' CPU repacking on every Linear4bit, in place (chapter 6).

    A layer already repacked gets its canonical codes and double-quantized absmax back through
    bitsandbytes' own inverse (the absmax are re-quantized from their bf16 copy, so they may
    differ from the stored ones: reload the model rather than rely on this). Returns the number
    of Linear4bit layers; raises ValueError when the model has none.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layers = _linear4bit_layers(model)
    if not layers:
        raise ValueError("this model has no bitsandbytes Linear4bit layer")
    for layer in layers:
        if is_repacked(layer):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                layer.weight.data, layer.weight.quant_state)
        layer.support_avx512bf16_for_cpu = False  # the attribute forward() checks before repacking
    return len(layers)


def _bnb_layer(weight: torch.Tensor, blocksize: int) -> nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=blocksize, compress_statistics=True)
    return layer.to("cpu")  # the move quantizes


def repacking_repro(out_features: int = 32, in_features: int = 64, rows: int = 3,
                    blocksize: int = 64, seed: int = 0) -> dict:
    """The smallest reproduction of the repacking defect, measured on one layer (chapter 6).

    One NF4 ``Linear4bit`` (compute dtype fp32, double quantization) of a random (out, in) weight.
    Expected: its output is x Q(W0)^T in fp32, as computed from ``dequantize_4bit`` before any
    forward. Measured after one eval forward on ``rows`` inputs without gradient: whether the
    layer was repacked, the largest output error of that forward, the share of entries of
    ``dequantize_4bit`` that changed, and, back in training mode, whether the input receives a
    gradient, and a correct one (and the warnings raised). The same layer with ``keep_canonical`` serves as control.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    if min(out_features, in_features, rows) < 1 or in_features % blocksize:
        raise ValueError(f"need positive sizes and in_features a multiple of blocksize "
                         f"{blocksize}, got ({out_features}, {in_features}), rows {rows}")
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05  # (out, in)
    x = torch.randn(rows, in_features, generator=gen)  # (rows, in)
    out = {"bitsandbytes": bnb.__version__, "torch": torch.__version__,
           "shape (out, in)": (out_features, in_features), "rows": rows}
    for label, canonical in (("as shipped", False), ("keep_canonical", True)):
        layer = _bnb_layer(weight, blocksize)
        if canonical:
            keep_canonical(layer)
        Wq = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in), fp32
        expected = x @ Wq.T  # (rows, out)
        layer.eval()
        with torch.no_grad():
            got = layer(x)  # the eval forward that may repack
        after = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        layer.train()
        xg = x.clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer(xg).sum().backward()
        if xg.grad is None:
            grad = "missing"
        else:  # d sum(x Q(W0)^T) / dx = the column sums of Q(W0), on every row
            right = torch.allclose(xg.grad, Wq.sum(0).expand(rows, -1), rtol=1e-5, atol=1e-6)
            grad = "correct" if right else "wrong"
        out[label] = {
            "repacked": is_repacked(layer),
            "quant_state dtype": str(layer.weight.quant_state.dtype).replace("torch.", ""),
            "max |x Q(W0)^T|": expected.abs().max().item(),
            "max |output - x Q(W0)^T|": (got - expected).abs().max().item(),
            "dequantize_4bit entries changed": (after != Wq).float().mean().item(),
            "input gradient": grad,
            "warnings in backward": sorted({str(w.message).split(". ")[0] for w in caught}),
        }
    return out
