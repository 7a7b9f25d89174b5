"""Initialisations after LoRA: PiSSA and LoftQ, computed on one weight matrix (chapter 8).

Both start from the SVD of a weight instead of B = 0, so that the adapter begins where it matters:

- **PiSSA** (Meng et al. 2024): W0 = U S V^T; the adapter takes the top-r singular triplets,
  B = U_r sqrt(S_r / scaling), A = sqrt(S_r / scaling) V_r^T, and the frozen base keeps the
  residual W_res = W0 - scaling B A. The model computes W0 at step 0, but trains the principal
  directions; on a 4-bit base only W_res is quantized ("QPiSSA").
- **LoftQ** (Li et al. 2023): alternate T times "quantize the residual, then take the top-r SVD of
  what quantization lost", so that Q + scaling B A approximates W0 better than Q(W0) alone.

The formulas follow peft 0.21 (``LoraLayer.pissa_init``, ``peft.utils.loftq_utils.loftq_init``)
operation for operation, so that the same weights give the same factors. One difference: peft's
LoftQ stores the SVD factors unscaled (correct only when scaling = alpha / r = 1); here each
factor is divided by sqrt(scaling), which equals peft's at scaling 1 and stays correct otherwise.
NF4 is ``lorabook.quant`` (byte-exact with bitsandbytes, blocksize 64, no double quantization, as
peft's LoftQ calls it).
"""

from __future__ import annotations

import math

import torch

from lorabook.quant.nf4 import dequantize_nf4, quantize_nf4

INIT_CHOICES = (True, "pissa", "loftq")  # init_lora_weights values apply_lora implements
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # peft's LoftQConfig defaults


def _check(W0: torch.Tensor, r: int, scaling: float, what: str) -> torch.Tensor:
    if not isinstance(W0, torch.Tensor) or W0.ndim != 2:
        raise ValueError(f"{what} needs a 2-D weight (out, in), got "
                         f"{tuple(W0.shape) if isinstance(W0, torch.Tensor) else type(W0).__name__}")
    if not W0.is_floating_point():
        raise TypeError(f"{what} needs a floating-point weight, got {W0.dtype}; initialise on the "
                        "float model, then quantize the residual")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if r > min(W0.shape):
        raise ValueError(f"{what}: r = {r} is above min(out, in) = {min(W0.shape)} for a weight of "
                         f"shape {tuple(W0.shape)}: the SVD has only {min(W0.shape)} triplets")
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling!r}")
    return W0.detach().to(torch.float32)


@torch.no_grad()
def pissa_factors(W0: torch.Tensor, r: int, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: (A (r, in), B (out, r), W_res (out, in)) with W_res + scaling B A = W0 (chapter 8)."""
    W = _check(W0, r, scaling, "PiSSA")  # (out, in) fp32
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (out, k), (k,), (k, in); k = min(out, in)
    Sr = S[:r] / scaling  # (r,) so that scaling B A = U_r S_r V_r^T
    A = torch.diag(torch.sqrt(Sr)) @ Vh[:r]  # (r, in)
    B = U[:, :r] @ torch.diag(torch.sqrt(Sr))  # (out, r)
    W_res = W - scaling * B @ A  # (out, in): what the frozen base keeps
    return A, B, W_res.to(W0.dtype)


def nf4_round_trip(W: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Q(W): quantize to NF4 and dequantize, fp32, same shape (chapter 8)."""
    packed, state = quantize_nf4(W.to(torch.float32), blocksize)
    return dequantize_nf4(packed, state)


def _top_r(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``_low_rank_decomposition``: L (out, r) = U_r sqrt(S_r), R (r, in) = sqrt(S_r) V_r^T."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    L = U @ torch.sqrt(torch.diag(S)[:, :r])  # (out, r)
    R = torch.sqrt(torch.diag(S)[:r, :]) @ Vh  # (r, in)
    return L, R


@torch.no_grad()
def loftq_factors(W0: torch.Tensor, r: int, scaling: float = 1.0, num_iter: int = 1,
                  num_bits: int = 4, blocksize: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """LoftQ: (A (r, in), B (out, r), Q (out, in) dequantized NF4, Frobenius error per iteration).

    Iteration t: Q_t = Q(W0 - L_{t-1} R_{t-1}) (L_0 R_0 = 0), then L_t R_t = top-r SVD of W0 - Q_t;
    its error is ||W0 - (Q_t + L_t R_t)||_F (chapter 8).
    """
    W = _check(W0, r, scaling, "LoftQ")  # (out, in) fp32
    if num_bits != 4:
        raise ValueError(f"LoftQ is built here for 4-bit NF4 only, got num_bits={num_bits!r}")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be an int >= 1, got {num_iter!r}")
    res, errors = W.clone(), []
    for i in range(num_iter):
        Q = nf4_round_trip(res, blocksize)  # (out, in)
        L, R = _top_r(W - Q, r)  # what quantization lost, its best rank-r part
        errors.append(torch.linalg.norm(W - Q - L @ R).item())
        if i + 1 < num_iter:
            res = W - L @ R  # quantize next what the adapter does not carry
    root = math.sqrt(scaling)  # scaling B A = L R
    return R / root, L / root, Q.to(W0.dtype), errors


@torch.no_grad()
def init_errors(W0: torch.Tensor, r: int, num_iter: int = 5, blocksize: int = 64) -> dict:
    """Frobenius error of the 4-bit model at step 0, ||W0 - (Q(base) + B A)||_F (chapter 8).

    QLoRA: ||W0 - Q(W0)|| (B = 0). QPiSSA: ||W0 - (Q(W_res) + B A)|| with PiSSA's factors.
    LoftQ: the error after each of ``num_iter`` iterations. All at scaling 1; plus ||W0||_F.
    """
    W = _check(W0, r, 1.0, "init_errors")
    A, B, W_res = pissa_factors(W, r, 1.0)
    *_, loftq = loftq_factors(W, r, 1.0, num_iter=num_iter, blocksize=blocksize)
    return {"norm_W0": torch.linalg.norm(W).item(),
            "qlora": torch.linalg.norm(W - nf4_round_trip(W, blocksize)).item(),
            "qpissa": torch.linalg.norm(W - nf4_round_trip(W_res, blocksize) - B @ A).item(),
            "loftq": loftq}
