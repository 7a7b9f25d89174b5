"""Intrinsic dimension in miniature: train d numbers z, run the model at theta0 + P z (chapter 2).

Aghajanyan et al. (2020) fine-tune a pre-trained model inside a random d-dimensional subspace of
its parameter space, theta = theta0 + P z with P (D x d) random and fixed, and only z trainable.
The smallest d that reaches 90% of full fine-tuning's score is the task's intrinsic dimension.

P cannot be dense here: for the 22.7M-parameter encoder and d = 1000 it would hold 22.7 billion
numbers (91 GB in fp32). We use a *hashed* random projection instead (the count-sketch /
"hashing trick"): every parameter theta_i follows ONE coordinate of z, chosen at random, with a
random sign,

    theta_i = theta0_i + scale * s_i * z[h(i)],   h(i) uniform in {0..d-1},  s_i uniform in {-1, +1}.

So P has one non-zero per row; its d columns have disjoint supports, hence are exactly orthogonal,
each with ~D/d entries of random sign. Storing h and s costs one int32 per parameter, and applying
P (or its transpose, in backward) is one gather (or one scatter-add) over D numbers, whatever d is.
The paper uses the Fastfood transform (structured, dense-like, O(D log d)); both give a random
subspace that is blind to the model's structure, which is what the measurement needs.

h and s are drawn from a generator seeded by (seed, parameter name): the same seed gives the same
P on any machine and in any parameter order.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call


def _tensor_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed per (seed, tensor name); Python's hash() is salted per process."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class _SignedGather(torch.autograd.Function):
    """delta = [z, -z][code]: gather with the sign folded into the index; backward = scatter-add."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(code)
        ctx.d = z.numel()
        return torch.cat([z, -z]).index_select(0, code)  # (numel,)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (code,) = ctx.saved_tensors
        summed = torch.zeros(2 * ctx.d, dtype=grad.dtype, device=grad.device)
        summed.index_add_(0, code, grad.reshape(-1))  # (2d,): sums per (coordinate, sign)
        return summed[:ctx.d] - summed[ctx.d:], None  # (d,)


class HashedProjection(nn.Module):
    """P (D x d) as a hashed random projection: z (d,) -> {name: delta tensor} (chapter 2).

    Each parameter gets one random coordinate of z and a random sign, times ``scale``. With
    scale = 1 a change of z[j] by epsilon moves every parameter hashed to j by +-epsilon.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], d: int, seed: int = 0,
                 scale: float = 1.0, device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be an int >= 1, got {d!r}")
        if d >= 2**30:
            raise ValueError(f"d must be < 2**30 (int32 codes), got {d}")
        if not shapes:
            raise ValueError("HashedProjection needs at least one parameter shape")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.d, self.seed, self.scale = d, seed, float(scale)
        self.names = list(shapes)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        for i, name in enumerate(self.names):
            g = torch.Generator().manual_seed(_tensor_seed(seed, name))
            n = self.shapes[name].numel()
            coordinate = torch.randint(d, (n,), generator=g, dtype=torch.int64)  # h(i)
            negative = torch.randint(2, (n,), generator=g, dtype=torch.int64)  # s_i = -1 where 1
            code = (coordinate + d * negative).to(torch.int32)  # index into [z, -z]
            self.register_buffer(f"code_{i}", code.to(device), persistent=False)

    @property
    def num_parameters(self) -> int:
        """D: how many parameters the projection reaches."""
        return sum(s.numel() for s in self.shapes.values())

    def codes(self) -> dict[str, torch.Tensor]:
        """{name: (numel,) int32 code}: coordinate h(i) = code % d, sign -1 where code >= d."""
        return {n: getattr(self, f"code_{i}") for i, n in enumerate(self.names)}

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        if z.shape != (self.d,):
            raise ValueError(f"z must have shape ({self.d},), got {tuple(z.shape)}")
        out = {}
        for name, code in self.codes().items():
            delta = _SignedGather.apply(z, code)  # (numel,)
            out[name] = (delta * self.scale if self.scale != 1.0 else delta).view(self.shapes[name])
        return out

    def dense(self) -> torch.Tensor:
        """P as a dense (D x d) matrix, rows in parameter order: only for small models and tests."""
        if self.num_parameters * self.d > 50_000_000:
            raise ValueError(f"a dense P would have {self.num_parameters} x {self.d} entries; "
                             "dense() is for small models only")
        rows = []
        for code in self.codes().values():
            code = code.long().cpu()
            P = torch.zeros(code.numel(), self.d)
            P[torch.arange(code.numel()), code % self.d] = torch.where(code >= self.d, -1.0, 1.0)
            rows.append(P * self.scale)
        return torch.cat(rows)  # (D, d)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class IntrinsicModel(nn.Module):
    """Train only z (d,): the wrapped model runs at theta0 + P z via functional_call (chapter 2).

    ``train_directly`` names modules (e.g. the new classification head, "classifier") whose
    parameters are not projected but trained as usual; every other parameter is frozen at theta0
    and moves only through P z. ``d = 0`` projects nothing: only ``train_directly`` learns (for a
    classifier, a linear probe on frozen features). Call it like the model: ``wrapped(**batch)``.
    """

    def __init__(self, model: nn.Module, d: int, seed: int = 0,
                 train_directly: Sequence[str] = ("classifier",), scale: float = 1.0) -> None:
        super().__init__()
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"d must be an int >= 0, got {d!r}")
        train_directly = [train_directly] if isinstance(train_directly, str) else list(train_directly)
        modules = dict(model.named_modules())
        missing = [p for p in train_directly if p not in modules]
        if missing:
            raise ValueError(f"train_directly {missing} are not modules of this model; top-level "
                             f"modules: {[n for n in modules if n and '.' not in n]}")
        self.model = model
        projected = {}
        for name, p in model.named_parameters():
            direct = _under(name, train_directly)
            p.requires_grad_(direct)  # theta0 is the model's own (frozen) parameters
            if not direct:
                projected[name] = p.shape
        if not projected:
            raise ValueError("every parameter is in train_directly: nothing left to project")
        self.d = d
        self.z = nn.Parameter(torch.zeros(d, device=next(model.parameters()).device))  # (d,)
        self.projection = HashedProjection(projected, d, seed, scale,
                                           device=self.z.device) if d > 0 else None

    def projected_weights(self) -> dict[str, torch.Tensor]:
        """{name: theta0 + P z} for every projected parameter (differentiable in z)."""
        if self.projection is None:
            return {}
        params = dict(self.model.named_parameters())
        return {n: params[n] + delta for n, delta in self.projection(self.z).items()}

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.projected_weights(), args=args, kwargs=kwargs,
                               tie_weights=True, strict=False)

    @torch.no_grad()
    def merged_model(self) -> nn.Module:
        """Write theta0 + P z into the wrapped model's parameters and return it (chapter 2).

        z is reset to 0 afterwards, so the wrapper still computes the same function.
        """
        for name, value in self.projected_weights().items():
            self.model.get_parameter(name).copy_(value)
        self.z.zero_()
        return self.model


def intrinsic_trainable(model: IntrinsicModel) -> int:
    """How many numbers an intrinsic run trains: d plus the directly trained parameters (chapter 2)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fraction_of_full(score: float, full_score: float, floor: float = 0.0) -> float:
    """(score - floor) / (full_score - floor): 1 = as good as full fine-tuning (chapter 2).

    floor = 0 is the paper's ratio; floor = chance accuracy (0.5 for two balanced classes)
    measures the share of full fine-tuning's gain over guessing.
    """
    if not full_score > floor:
        raise ValueError(f"full_score ({full_score}) must exceed floor ({floor})")
    return (score - floor) / (full_score - floor)


def smallest_d(scores: Mapping[int, float], full_score: float, fraction: float = 0.9,
               floor: float = 0.0) -> int | None:
    """The smallest d whose score reaches ``fraction`` of full fine-tuning's, or None (chapter 2)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    hits = [d for d, s in scores.items() if fraction_of_full(s, full_score, floor) >= fraction]
    return min(hits) if hits else None
