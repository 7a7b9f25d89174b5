"""lorabook.analysis against closed-form linear algebra."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lorabook.analysis import (
    amplification,
    energy_captured,
    extract_delta_weights,
    low_rank_approx,
    random_like_spectrum,
    relative_error,
    singular_values,
    subspace_similarity,
    subspace_similarity_grid,
)
from lorabook.lora import apply_lora, lora_layers, merge_lora


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return Q  # (n, k)


def _with_spectrum(s: list[float], m: int = 12, n: int = 9, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U, V: a matrix whose singular values we chose."""
    k = len(s)
    return _orthonormal(m, k, seed) @ torch.diag(torch.tensor(s, dtype=torch.float64)) \
        @ _orthonormal(n, k, seed + 1).T


def test_singular_values_are_the_chosen_ones():
    M = _with_spectrum([5.0, 3.0, 0.5])
    s = singular_values(M)
    assert s.shape == (9,)
    torch.testing.assert_close(s[:3], torch.tensor([5.0, 3.0, 0.5], dtype=torch.float64))
    assert s[3:].abs().max() < 1e-12


def test_energy_of_known_spectrum():
    M = _with_spectrum([3.0, 2.0, 1.0])  # energies 9, 4, 1 out of 14
    got = energy_captured(M, [0, 1, 2, 3, 50])
    want = torch.tensor([0, 9 / 14, 13 / 14, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert energy_captured(M).shape == (9,)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_exact_rank_k_energy_hits_one_at_k(k):
    g = torch.Generator().manual_seed(k)
    M = torch.randn(20, k, generator=g, dtype=torch.float64) @ torch.randn(k, 15, generator=g,
                                                                          dtype=torch.float64)
    energy = energy_captured(M, [k - 1, k])
    assert energy[0] < 1 - 1e-6 and abs(float(energy[1]) - 1) < 1e-12


def test_random_baseline_has_same_shape_norm_and_a_flat_spectrum():
    low_rank = _with_spectrum([4.0], m=64, n=48).float()
    noise = random_like_spectrum(low_rank, seed=3)
    assert noise.shape == low_rank.shape and noise.dtype == low_rank.dtype
    assert math.isclose(float(noise.norm()), float(low_rank.norm()), rel_tol=1e-5)
    torch.testing.assert_close(noise, random_like_spectrum(low_rank, seed=3))
    assert not torch.equal(noise, random_like_spectrum(low_rank, seed=4))
    assert energy_captured(noise, [1])[0] < 0.2 < 0.99 < energy_captured(low_rank, [1])[0]


def test_low_rank_approx_meets_eckart_young():
    s = [6.0, 4.0, 2.0, 1.0, 0.5]
    M = _with_spectrum(s)
    for r in range(0, 6):
        approx = low_rank_approx(M, r)
        tail = math.sqrt(sum(x * x for x in s[r:]))
        assert relative_error(M, approx) == pytest.approx(tail / math.sqrt(sum(x * x for x in s)),
                                                          abs=1e-12)
        assert int(torch.linalg.matrix_rank(approx)) == r
    torch.testing.assert_close(low_rank_approx(M, 9), M, atol=1e-12, rtol=0)  # full rank: exact
    # another rank-2 matrix (M projected on a random 2-D column space) does worse
    P = _orthonormal(12, 2, 7)
    other = P @ P.T @ M
    assert relative_error(M, other) > relative_error(M, low_rank_approx(M, 2)) + 1e-3


def test_low_rank_keeps_dtype_and_rejects_bad_input():
    M = torch.randn(8, 6)
    assert low_rank_approx(M, 2).dtype == torch.float32
    with pytest.raises(ValueError, match=">= 0"):
        low_rank_approx(M, -1)
    with pytest.raises(TypeError, match="int"):
        low_rank_approx(M, 1.5)
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(M, M.T)
    with pytest.raises(ValueError, match="all zeros"):
        energy_captured(torch.zeros(4, 4))


def test_subspace_similarity_with_itself_is_one():
    A = torch.randn(8, 40)
    grid = subspace_similarity_grid(A, A)
    assert grid.shape == (8, 8)
    torch.testing.assert_close(grid, torch.ones(8, 8, dtype=torch.float64), atol=1e-10, rtol=0)
    # the same row space in another basis spans the same subspace at i = j = r
    Q = _orthonormal(8, 8, 1).float()
    assert subspace_similarity(A, Q @ A, 8, 8) == pytest.approx(1.0, abs=1e-6)


def test_subspace_similarity_of_orthogonal_and_rotated_subspaces():
    eye = torch.eye(10, dtype=torch.float64)
    A1, A2 = eye[:4] * torch.arange(4, 0, -1)[:, None], eye[4:8]
    assert subspace_similarity_grid(A1, A2).abs().max() < 1e-12
    t = 0.3  # A1's top direction is e0 (its largest row); tilt it by t towards e5
    A1 = torch.stack([2 * eye[0], eye[1]])
    A2 = (math.cos(t) * eye[0] + math.sin(t) * eye[5])[None]
    assert subspace_similarity(A1, A2, 1, 1) == pytest.approx(math.cos(t) ** 2, abs=1e-12)
    assert subspace_similarity(A1, A2, 2, 1) == pytest.approx(math.cos(t) ** 2, abs=1e-12)
    with pytest.raises(ValueError, match="1..2"):
        subspace_similarity(A1, A2, 3, 1)
    with pytest.raises(ValueError, match="1..1"):
        subspace_similarity(A1, A2, 1, 0)
    with pytest.raises(ValueError, match="in_features"):
        subspace_similarity_grid(A1, torch.randn(2, 7))


def test_amplification_closed_form():
    W = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64))
    delta_W = torch.zeros(4, 4, dtype=torch.float64)
    delta_W[3, 3] = 2.0  # delta_W pushes the direction W barely uses
    out = amplification(W, delta_W, r=1)
    assert out["delta_norm"] == pytest.approx(2.0)
    assert out["proj_delta"] == pytest.approx(0.1)
    assert out["factor"] == pytest.approx(20.0)
    assert out["proj_w"] == pytest.approx(10.0)
    assert out["w_norm"] == pytest.approx(math.sqrt(100 + 25 + 1 + 0.01))
    assert 0 <= out["proj_random"] <= out["proj_w"]
    with pytest.raises(ValueError, match="1..4"):
        amplification(W, delta_W, r=5)


def test_extract_delta_weights_full_and_lora(tiny_llama):
    base = tiny_llama
    tuned = copy.deepcopy(base)
    delta = torch.randn(32, 32)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(delta)
    deltas = extract_delta_weights(tuned, base, ["q_proj"])
    assert list(deltas) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(deltas["model.layers.0.self_attn.q_proj"], delta)
    assert deltas["model.layers.1.self_attn.q_proj"].abs().max() == 0
    assert len(extract_delta_weights(tuned, base)) == 2 * 7 + 1  # every linear, lm_head too

    lora = apply_lora(copy.deepcopy(base), ["v_proj"], r=2, alpha=4)
    with torch.no_grad():
        for _, layer in lora_layers(lora):
            layer.B.normal_()
    want = {n: layer.delta_weight().detach() for n, layer in lora_layers(lora)}
    got = extract_delta_weights(lora, base, r".*v_proj")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    merged = extract_delta_weights(merge_lora(lora), base, ["v_proj"])
    for name in want:
        torch.testing.assert_close(merged[name], want[name], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="matched no linear"):
        extract_delta_weights(tuned, base, ["nope"])
