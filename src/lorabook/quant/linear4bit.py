"""A frozen 4-bit linear layer and the function that puts it into a model (chapter 5).

``LinearNF4`` stores W0 packed in 4 bits with its QuantState as buffers and the bias as a
frozen parameter. Forward dequantizes W0 straight into the compute dtype (the input's unless
given) and calls ``F.linear``, as bitsandbytes' ``Linear4bit`` does on CPU. Nothing in it
requires grad; gradients still flow to the input, which is all QLoRA needs of the base layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lorabook.quant.formats import quantize_4bit
from lorabook.quant.nf4 import dequantize_4bit
from lorabook.quant.state import DoubleQuantState, QuantState

# Buffers that hold the quantization state: they follow the module across devices but keep
# their dtype when the model is cast (model.to(torch.bfloat16) must not round the absmax).
_STATE_BUFFERS = ("weight_packed", "absmax", "codebook", "absmax_offset", "absmax2", "codebook2")


class LinearNF4(nn.Module):
    """y = x W0^T + b with W0 stored in 4 bits, dequantized in forward (chapter 5)."""

    def __init__(self, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError("expected the state of a 2-D weight (out, in), got shape "
                             f"{tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.weight_dtype = state.dtype  # dtype of W0 before quantization
        self.compute_dtype = compute_dtype  # None: the input's dtype
        self.register_buffer("weight_packed", packed)  # ((out * in + 1) // 2, 1) uint8
        self.register_buffer("absmax", state.absmax)  # (n_blocks,) fp32, or uint8 with DQ
        self.register_buffer("codebook", state.codebook)  # (16,) fp32
        dq = state.state2
        self.blocksize2 = dq.blocksize if dq is not None else None
        self.register_buffer("absmax_offset", state.offset)  # () fp32 or None
        self.register_buffer("absmax2", dq.absmax if dq is not None else None)
        self.register_buffer("codebook2", dq.codebook if dq is not None else None)
        self.bias = None  # frozen, like W0
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._dense = None  # inside dense_weights(): {dtype: dequantized W0}, reused by forward

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4", compute_dtype: torch.dtype | None = None) -> LinearNF4:
        """Quantize an nn.Linear's weight (and keep its bias) into a LinearNF4 (chapter 5)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        packed, state = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant)
        return cls(packed, state, linear.bias, compute_dtype)

    @property
    def quant_state(self) -> QuantState:
        """The QuantState of W0, rebuilt from the buffers (chapter 5)."""
        state2 = None
        if self.absmax2 is not None:
            state2 = DoubleQuantState(self.absmax2, self.codebook2, self.blocksize2)
        return QuantState(self.absmax, torch.Size((self.out_features, self.in_features)),
                          self.weight_dtype, self.blocksize, self.codebook, self.quant_type,
                          self.absmax_offset, state2)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 as a dense (out, in) tensor, in ``dtype`` or the original weight dtype (chapter 5)."""
        return dequantize_4bit(self.weight_packed, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        if self._dense is not None:  # inside dense_weights(): dequantize once
            if dtype not in self._dense:
                self._dense[dtype] = self.dequantized_weight(dtype)
            W = self._dense[dtype]
        else:
            W = self.dequantized_weight(dtype)  # (out, in), recomputed each call: only 4 bits stay
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), W, bias).to(x.dtype)  # (..., out)

    def _apply(self, fn, recurse=True):
        state = {k: self._buffers.pop(k) for k in _STATE_BUFFERS
                 if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=state["weight_packed"].device)).device
        self._buffers.update({k: v.to(device) for k, v in state.items()})
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.absmax2 is not None}")


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return name in skip or name.rsplit(".", 1)[-1] in skip


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   quant_type: str = "nf4", skip: tuple[str, ...] = ("lm_head",),
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Swap the nn.Linear layers of ``model`` for LinearNF4, in place, except ``skip`` (chapter 5).

    A name in ``skip`` matches a module's full dotted name or its last part. Embeddings are
    not nn.Linear and stay as they are; lm_head is skipped unless ``skip`` leaves it out.
    """
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model swaps the nn.Linear children of a model; for a single "
                         "layer use LinearNF4.from_linear")
    if isinstance(skip, str):
        skip = (skip,)
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not _skipped(name, tuple(skip))]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LinearNF4.from_linear(getattr(parent, child), blocksize, double_quant,
                                      quant_type, compute_dtype)
        setattr(parent, child, layer)
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the model stores: parameters and buffers, shared tensors once (chapter 5)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@contextmanager
def dense_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, each LinearNF4 dequantizes W0 once and reuses it (chapter 6).

    For generation: every new token is a forward pass over the same weights, and dequantizing
    them each time costs more than the matrix products on a CPU. The outputs are bit-identical
    (the same dense tensor goes into ``F.linear``); memory rises to the dense size meanwhile, and
    falls back when the block ends. Not for training: the weights are frozen, but a held dense
    W0 is what QLoRA avoids keeping.
    """
    layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    for layer in layers:
        layer._dense = {}
    try:
        yield model
    finally:
        for layer in layers:
            layer._dense = None
