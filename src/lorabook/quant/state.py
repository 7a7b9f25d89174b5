"""What a 4-bit tensor carries besides its packed codes: the QuantState (chapter 5).

``QuantState`` holds everything ``dequantize_4bit`` needs: the per-block absmax (fp32, or 8-bit
codes plus an offset and a second-level state when double quantised), the original shape and
dtype, the blocksize and the 16-entry codebook. It converts to and from
``bitsandbytes.functional.QuantState`` so either library dequantizes the other's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

QUANT_TYPES = ("nf4", "fp4", "int4")  # the 4-bit formats this package builds (chapter 5)

_TABLES: dict[tuple, torch.Tensor] = {}  # lookup tables built from a codebook, reused per layer


def cached_table(kind: str, codebook: torch.Tensor,
                 build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, memoised by kind, codebook values and device (chapter 5).

    Quantizing a model builds the same 65,536-entry table for every layer; keyed by the codebook's
    values, a custom codebook still gets its own table.
    """
    key = (kind, str(codebook.device), codebook.dtype, tuple(codebook.tolist()))
    if key not in _TABLES:
        if len(_TABLES) > 32:  # a few codebooks per session; never grow without bound
            _TABLES.clear()
        _TABLES[key] = build()
    return _TABLES[key]


@dataclass
class DoubleQuantState:
    """Second-level state of double quantization: the absmax of the absmax blocks (chapter 5)."""

    absmax: torch.Tensor  # (ceil(n_blocks / blocksize),) fp32 absmax of (absmax - offset) blocks
    codebook: torch.Tensor  # (256,) fp32: the signed dynamic 8-bit map
    blocksize: int = 256  # absmax values per second-level block (QLoRA and bitsandbytes use 256)


@dataclass
class QuantState:
    """Everything needed to undo a blockwise 4-bit quantization (chapter 5)."""

    absmax: torch.Tensor  # (n_blocks,) fp32 absmax, or uint8 codes of absmax - offset with DQ
    shape: torch.Size  # shape of the original tensor W
    dtype: torch.dtype  # dtype of the original tensor W (dequantize returns it)
    blocksize: int  # consecutive (row-major) elements sharing one absmax; 64 in QLoRA
    codebook: torch.Tensor  # (16,) fp32: value of each 4-bit code, in [-1, 1]
    quant_type: str = "nf4"  # "nf4", "fp4" or "int4"
    offset: torch.Tensor | None = None  # () fp32 mean of the absmax, double quantization only
    state2: DoubleQuantState | None = None  # second-level state, double quantization only

    @property
    def double_quant(self) -> bool:
        """True when the absmax are stored as 8-bit codes (chapter 5)."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor (chapter 5)."""
        return self.shape.numel()

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax as fp32, undoing double quantization if used (chapter 5)."""
        if not self.double_quant:
            return self.absmax
        from lorabook.quant.double_quant import dequantize_blockwise_8bit

        return dequantize_blockwise_8bit(self.absmax, self.state2) + self.offset  # (n_blocks,)

    def nbytes(self) -> int:
        """Bytes of the per-block statistics actually stored (codebooks excluded) (chapter 5)."""
        total = self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.state2.absmax.numel() * self.state2.absmax.element_size()
            total += self.offset.numel() * self.offset.element_size()
        return total

    def to(self, device: torch.device | str) -> QuantState:
        """A copy of the state with every tensor on ``device`` (chapter 5)."""
        state2 = None
        if self.state2 is not None:
            state2 = DoubleQuantState(self.state2.absmax.to(device),
                                      self.state2.codebook.to(device), self.state2.blocksize)
        return QuantState(self.absmax.to(device), self.shape, self.dtype, self.blocksize,
                          self.codebook.to(device), self.quant_type,
                          None if self.offset is None else self.offset.to(device), state2)

    def to_bnb(self):
        """The equivalent ``bitsandbytes.functional.QuantState`` (chapter 5)."""
        from bitsandbytes.functional import QuantState as BnbQuantState

        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bitsandbytes has no 4-bit format {self.quant_type!r}; "
                             "only 'nf4' and 'fp4' states convert")
        state2 = None
        if self.double_quant:
            state2 = BnbQuantState(absmax=self.state2.absmax, code=self.state2.codebook,
                                   blocksize=self.state2.blocksize, dtype=torch.float32)
        return BnbQuantState(absmax=self.absmax, shape=self.shape, code=self.codebook,
                             blocksize=self.blocksize, quant_type=self.quant_type,
                             dtype=self.dtype, offset=self.offset, state2=state2)

    @classmethod
    def from_bnb(cls, qs) -> QuantState:
        """Our state from a ``bitsandbytes.functional.QuantState`` of a 4-bit tensor (chapter 5)."""
        if qs.quant_type not in ("nf4", "fp4") or qs.shape is None:
            raise ValueError("expected the QuantState of a 4-bit tensor (quant_type 'nf4' or "
                             f"'fp4' and a shape), got quant_type={qs.quant_type!r}")
        state2 = None
        offset = None
        if qs.nested:
            state2 = DoubleQuantState(qs.state2.absmax, qs.state2.code, int(qs.state2.blocksize))
            offset = torch.as_tensor(qs.offset, dtype=torch.float32)
        return cls(absmax=qs.absmax, shape=torch.Size(qs.shape), dtype=qs.dtype,
                   blocksize=int(qs.blocksize), codebook=qs.code, quant_type=qs.quant_type,
                   offset=offset, state2=state2)


def bits_per_parameter(state: QuantState, packed: torch.Tensor | None = None) -> float:
    """Bits stored per weight, measured from the tensors: packed codes plus statistics (chapter 5).

    ``packed`` defaults to the size ``quantize_4bit`` produces, ceil(n / 2) bytes. The shared
    codebooks (16 and 256 floats for the whole model) are not counted.
    """
    n = state.numel
    packed_bytes = (n + 1) // 2 if packed is None else packed.numel() * packed.element_size()
    return 8.0 * (packed_bytes + state.nbytes()) / n
