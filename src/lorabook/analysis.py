"""Linear algebra of weight updates: spectra, low-rank approximation, subspace similarity,
amplification (chapters 2 and 4).

Everything is computed in float64 on the CPU copy of the tensors (matrices here are at most a few
thousand wide), so closed-form identities hold to ~1e-12 and results do not depend on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorabook.lora import LoRALinear, _is_linear_like, _name_matches


def _as_matrix(M: torch.Tensor, name: str = "M") -> torch.Tensor:
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(M.shape)}")
    if not M.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {M.dtype}")
    return M.detach().to("cpu", torch.float64)


def _check_rank(r: int, name: str = "r") -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name} must be an int, got {r!r}")
    if r < 0:
        raise ValueError(f"{name} must be >= 0, got {r}")
    return r


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """Singular values of M, descending, float64 (chapter 2)."""
    return torch.linalg.svdvals(_as_matrix(M))


def energy_captured(delta_W: torch.Tensor, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """Fraction of ||delta_W||_F^2 held by its top-r singular directions, for each r (chapter 2).

    ``ranks=None`` means every r from 1 to min(out, in); the result has one entry per rank.
    """
    s2 = singular_values(delta_W) ** 2  # (k,)
    total = s2.sum()
    if total == 0:
        raise ValueError("delta_W is all zeros: the fraction of its energy is undefined")
    if ranks is None:
        ranks = range(1, len(s2) + 1)
    ranks = [_check_rank(r, "rank") for r in ranks]
    cumulative = torch.cat([torch.zeros(1, dtype=s2.dtype), torch.cumsum(s2, 0)])  # (k + 1,)
    return cumulative[[min(r, len(s2)) for r in ranks]] / total


def random_like_spectrum(delta_W: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A Gaussian matrix of delta_W's shape, dtype and Frobenius norm: no structure (chapter 2)."""
    M = _as_matrix(delta_W, "delta_W")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(M.shape, generator=g, dtype=torch.float64)
    return (noise * (M.norm() / noise.norm())).to(delta_W.dtype)


def low_rank_approx(M: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation of M (truncated SVD, Eckart-Young), in M's dtype (chapter 2)."""
    r = _check_rank(r)
    U, S, Vh = torch.linalg.svd(_as_matrix(M), full_matrices=False)  # (m, k), (k,), (k, n)
    approx = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]  # (m, n)
    return approx.to(M.dtype)


def relative_error(M: torch.Tensor, approx: torch.Tensor) -> float:
    """||M - approx||_F / ||M||_F (chapter 2)."""
    M64, A64 = _as_matrix(M), _as_matrix(approx, "approx")
    if M64.shape != A64.shape:
        raise ValueError(f"shapes differ: M {tuple(M64.shape)} vs approx {tuple(A64.shape)}")
    norm = M64.norm()
    if norm == 0:
        raise ValueError("M is all zeros: the relative error is undefined")
    return float((M64 - A64).norm() / norm)


def _right_singular_vectors(A: torch.Tensor, name: str) -> torch.Tensor:
    """Columns = right singular vectors of A (r x in), in order of decreasing singular value."""
    _, _, Vh = torch.linalg.svd(_as_matrix(A, name), full_matrices=False)  # Vh: (k, in)
    return Vh.T  # (in, k)


def subspace_similarity_grid(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """phi(A1, A2, i, j) for every i, j: entry [i - 1, j - 1] (the paper's Figure 3) (chapter 4)."""
    V1, V2 = _right_singular_vectors(A1, "A1"), _right_singular_vectors(A2, "A2")
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(f"A1 and A2 must share in_features, got {V1.shape[0]} and {V2.shape[0]}")
    overlap = (V1.T @ V2) ** 2  # (k1, k2): squared cosines between directions
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ||V1[:, :i]^T V2[:, :j]||_F^2
    i = torch.arange(1, V1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, V2.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """phi = ||V1[:, :i]^T V2[:, :j]||_F^2 / min(i, j); V: right singular vectors (chapter 4)."""
    grid = subspace_similarity_grid(A1, A2)
    for name, value, limit in (("i", i, grid.shape[0]), ("j", j, grid.shape[1])):
        if _check_rank(value, name) < 1 or value > limit:
            raise ValueError(f"{name} must be in 1..{limit}, got {value}")
    return float(grid[i - 1, j - 1])


def _projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    return float((U.T @ W @ V).norm())  # ||U^T W V||_F with U (m, r), V (n, r)


def amplification(W: torch.Tensor, delta_W: torch.Tensor, r: int,
                  seed: int = 0) -> dict[str, float]:
    """The paper's Table 7: does delta_W amplify directions W does not emphasise (chapter 4)?

    Returns ||delta_W||_F, ||W||_F, and ||U^T W V||_F for three r-dimensional subspaces: delta_W's
    top-r singular directions ("proj_delta"), W's own ("proj_w") and random ones
    ("proj_random"); "factor" = ||delta_W||_F / proj_delta.
    """
    W64, D64 = _as_matrix(W, "W"), _as_matrix(delta_W, "delta_W")
    if W64.shape != D64.shape:
        raise ValueError(f"W {tuple(W64.shape)} and delta_W {tuple(D64.shape)} must match")
    if _check_rank(r) < 1 or r > min(W64.shape):
        raise ValueError(f"r must be in 1..{min(W64.shape)}, got {r}")
    Ud, _, Vhd = torch.linalg.svd(D64, full_matrices=False)
    Uw, _, Vhw = torch.linalg.svd(W64, full_matrices=False)
    g = torch.Generator().manual_seed(seed)
    Ur, _ = torch.linalg.qr(torch.randn(W64.shape[0], r, generator=g, dtype=torch.float64))
    Vr, _ = torch.linalg.qr(torch.randn(W64.shape[1], r, generator=g, dtype=torch.float64))
    proj_delta = _projection_norm(W64, Ud[:, :r], Vhd[:r].T)
    return {
        "delta_norm": float(D64.norm()),
        "w_norm": float(W64.norm()),
        "proj_delta": proj_delta,
        "proj_w": _projection_norm(W64, Uw[:, :r], Vhw[:r].T),
        "proj_random": _projection_norm(W64, Ur, Vr),
        "factor": float(D64.norm()) / proj_delta if proj_delta > 0 else float("inf"),
    }


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer applies: W0 + delta_W for an unmerged LoRA layer, else its weight."""
    if isinstance(module, LoRALinear):
        W = module.base_layer.weight.detach().float()
        return W if module.merged else W + module.delta_weight().detach().float()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != 2:
        raise TypeError(f"{type(module).__name__} has no floating-point 2-D weight")
    return weight.detach().float()


def extract_delta_weights(model_finetuned: nn.Module, model_base: nn.Module,
                          names: str | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """delta_W = W_finetuned - W0 per linear layer, fp32 on the CPU (chapter 2).

    ``names`` are matched as in apply_lora (regex str, or names / name suffixes); None takes every
    linear layer. A LoRA layer of either model counts as W0 + delta_W (or its merged weight).
    """
    modules = dict(model_finetuned.named_modules())
    lora_names = {n for n, m in modules.items() if isinstance(m, LoRALinear)}
    base_modules = dict(model_base.named_modules())
    deltas = {}
    for name, module in modules.items():
        inside_lora = name.rpartition(".")[0] in lora_names  # a LoRA layer's own base_layer
        if not name or inside_lora or not (_is_linear_like(module) or name in lora_names):
            continue
        if names is not None and not _name_matches(name, names):
            continue
        if name not in base_modules:
            raise ValueError(f"{name!r} exists in the fine-tuned model but not in the base model")
        W1, W0 = _effective_weight(module), _effective_weight(base_modules[name])
        if W1.shape != W0.shape:
            raise ValueError(f"{name}: shapes differ, {tuple(W1.shape)} vs {tuple(W0.shape)}")
        deltas[name] = (W1.cpu() - W0.cpu())  # (out, in)
    if not deltas:
        raise ValueError(f"names {names!r} matched no linear layer of the fine-tuned model")
    return deltas
