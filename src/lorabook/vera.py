"""VeRA: one frozen random pair A, B shared by all layers, and two trained vectors per layer
(Kopiczko et al. 2024), chapter 8.

h = W0 x + Lambda_b B Lambda_d A x with A (r x in_max) and B (out_max x r) random and frozen,
shared by every adapted layer (each takes its slice A[:, :in], B[:out, :]), and trained scaling
vectors d (r,) and b (out,). Per layer it trains r + out numbers instead of LoRA's r (in + out).
Conventions of peft 0.21's ``VeraConfig`` so that the same ``projection_prng_key`` gives the same
A and B: one generator seeded with the key draws A then B, Kaiming-uniform with bound
sqrt(6 / fan_in); d starts at ``d_initial`` (0.1), b at zero (so delta_W = 0); no alpha.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorabook.lora import WrapsLinear, _resolve_targets, lora_layers


class VeRAProjections(nn.Module):
    """The shared frozen pair: A (r, in_max), B (out_max, r), non-persistent buffers (chapter 8)."""

    def __init__(self, r: int, in_max: int, out_max: int, projection_prng_key: int = 0):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(projection_prng_key)
        self.register_buffer("A", _kaiming_uniform((r, in_max), generator), persistent=False)
        self.register_buffer("B", _kaiming_uniform((out_max, r), generator), persistent=False)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound), bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1] (peft's)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRALinear(WrapsLinear):
    """A frozen linear layer plus b * (B (d * (A x))) with the shared A, B sliced (chapter 8)."""

    def __init__(self, base: nn.Module, projections: VeRAProjections, d_initial: float = 0.1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"VeRALinear wraps an nn.Linear, got {type(base).__name__}")
        r, in_max = projections.A.shape
        if base.in_features > in_max or base.out_features > projections.B.shape[0]:
            raise ValueError(f"the shared projections are ({r}, {in_max}) and "
                             f"({projections.B.shape[0]}, {r}); too small for a layer "
                             f"({base.out_features}, {base.in_features})")
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features, self.r = base.in_features, base.out_features, r
        self.projections = projections  # shared: the same module object in every layer
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device))  # (r,)
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))  # (out,)
        self.merged = False

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = self.projections.A[:, :self.in_features]  # (r, in)
        B = self.projections.B[:self.out_features, :]  # (out, r)
        return A, B

    def delta_weight(self) -> torch.Tensor:
        """delta_W = diag(b) B diag(d) A, shape (out, in) (chapter 8)."""
        A, B = self._slices()
        return (self.lambda_b[:, None] * B) @ (self.lambda_d[:, None] * A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        A, B = self._slices()
        xd = self.dropout(x.to(self.lambda_d.dtype))
        update = self.lambda_b * F.linear(self.lambda_d * F.linear(xd, A), B)  # (..., out)
        return (result + update).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + delta_W (chapter 8)."""
        if self.merged:
            raise RuntimeError("this VeRA layer is already merged")
        self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - delta_W (chapter 8)."""
        if not self.merged:
            raise RuntimeError("this VeRA layer is not merged; nothing to unmerge")
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, merged={self.merged}"


def vera_layers(model: nn.Module) -> Iterator[tuple[str, VeRALinear]]:
    """Yield (module name, VeRALinear) for every VeRA layer of the model (chapter 8)."""
    for name, module in model.named_modules():
        if isinstance(module, VeRALinear):
            yield name, module


def apply_vera(model: nn.Module, target_modules: str | Sequence[str], r: int = 256,
               projection_prng_key: int = 0, d_initial: float = 0.1, dropout: float = 0.0,
               modules_to_save: Sequence[str] | None = None) -> nn.Module:
    """Wrap the targets in VeRALinear sharing one A, B; freeze the rest (chapter 8).

    Targets are matched as in ``apply_lora`` (peft's rules); defaults are peft's VeraConfig's.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if any(True for _ in vera_layers(model)) or any(True for _ in lora_layers(model)):
        raise ValueError("this model already has adapter layers")
    names = _resolve_targets(model, target_modules, modules_to_save, strict=True)
    bases = {n: model.get_submodule(n) for n in names}
    for n, base in bases.items():
        if not isinstance(base, nn.Linear):
            raise TypeError(f"VeRA targets nn.Linear layers; {n!r} is a {type(base).__name__}")
    out_max = max(b.out_features for b in bases.values())  # peft: the largest shape of all
    in_max = max(b.in_features for b in bases.values())
    device = next(iter(bases.values())).weight.device
    projections = VeRAProjections(r, in_max, out_max, projection_prng_key).to(device)
    model.requires_grad_(False)
    for name, base in bases.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, VeRALinear(base, projections, d_initial,
                                                               dropout))
    for name, module in model.named_modules():
        if name and modules_to_save and any(name == m or name.endswith("." + m)
                                            for m in modules_to_save):
            module.requires_grad_(True)
    return model
