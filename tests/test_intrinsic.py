"""lorabook.intrinsic: theta0 + P z with a hashed random projection (chapter 2)."""

from __future__ import annotations

import pytest
import torch

from lorabook import intrinsic
from lorabook.intrinsic import HashedProjection, IntrinsicModel
from lorabook.train import TrainConfig, train


def _batch(n: int = 8, T: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, T), generator=g)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": (ids[:, 0] % 2).long()}  # (B,) a label the model can learn from token 0


def test_z_zero_gives_theta0_outputs_exactly(tiny_bert):
    batch = _batch()
    with torch.no_grad():
        expected = tiny_bert(**batch).logits
        wrapped = IntrinsicModel(tiny_bert, d=7, seed=0).eval()
        got = wrapped(**batch).logits
    assert torch.equal(got, expected)


def test_z_moves_the_outputs(tiny_bert):
    batch = _batch()
    wrapped = IntrinsicModel(tiny_bert, d=7, seed=0).eval()
    with torch.no_grad():
        before = wrapped(**batch).logits
        wrapped.z.fill_(0.05)
        after = wrapped(**batch).logits
    assert not torch.allclose(before, after)


def test_gradients_reach_z_and_the_head_only(tiny_bert):
    wrapped = IntrinsicModel(tiny_bert, d=5, seed=0, train_directly=("classifier",))
    wrapped(**_batch()).loss.backward()
    assert wrapped.z.grad is not None and wrapped.z.grad.abs().sum() > 0
    for name, p in tiny_bert.named_parameters():
        if name.startswith("classifier."):
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, name
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {"z", "model.classifier.weight", "model.classifier.bias"}
    assert intrinsic.intrinsic_trainable(wrapped) == 5 + 32 * 2 + 2


def test_gradient_of_z_is_P_transpose_times_the_parameter_gradient(tiny_bert):
    """Oracle: the chain rule with the dense P, dL/dz = P^T dL/dtheta."""
    wrapped = IntrinsicModel(tiny_bert, d=6, seed=3, train_directly=())
    with torch.no_grad():
        wrapped.z.normal_(0, 0.01)
    batch = _batch()
    wrapped(**batch).loss.backward()
    theta = {n: w.detach().requires_grad_(True) for n, w in wrapped.projected_weights().items()}
    loss = torch.func.functional_call(tiny_bert, theta, kwargs=batch).loss
    grads = torch.autograd.grad(loss, list(theta.values()))
    flat = torch.cat([g.reshape(-1) for g in grads])  # (D,) in projection order
    assert list(theta) == wrapped.projection.names
    expected = wrapped.projection.dense().T @ flat  # (d,)
    torch.testing.assert_close(wrapped.z.grad, expected, atol=1e-6, rtol=1e-4)


def test_projection_is_deterministic_per_seed():
    shapes = {"a.weight": (30, 20), "b.bias": (20,)}
    p1, p2 = HashedProjection(shapes, d=9, seed=1), HashedProjection(shapes, d=9, seed=1)
    p3 = HashedProjection(shapes, d=9, seed=2)
    reversed_order = HashedProjection(dict(reversed(list(shapes.items()))), d=9, seed=1)
    for name, code in p1.codes().items():
        assert torch.equal(code, p2.codes()[name])
        assert torch.equal(code, reversed_order.codes()[name])  # keyed by name, not position
    assert not torch.equal(p1.codes()["a.weight"], p3.codes()["a.weight"])


def test_projection_structure_one_signed_entry_per_row_orthogonal_columns():
    proj = HashedProjection({"w": (400, 50)}, d=10, seed=0, scale=0.5)
    P = proj.dense()  # (20000, 10)
    assert P.shape == (20_000, 10)
    assert torch.equal((P != 0).sum(1), torch.ones(20_000, dtype=torch.long))
    assert set(P[P != 0].unique().tolist()) == {-0.5, 0.5}
    gram = P.T @ P  # (10, 10): diagonal, since columns have disjoint supports
    assert torch.equal(gram, torch.diag(torch.diagonal(gram)))
    assert (torch.diagonal(gram) / 0.25).sum() == 20_000
    z = torch.randn(10)
    torch.testing.assert_close(proj(z)["w"].reshape(-1), P @ z)
    # signs are balanced and every coordinate is used about equally (2,000 entries each)
    assert abs(float((P > 0).sum() - (P < 0).sum())) < 600
    assert (P != 0).sum(0).min() > 1_700


def test_small_d_run_lowers_the_loss(tiny_bert):
    wrapped = IntrinsicModel(tiny_bert, d=32, seed=0)
    items = [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i],
              "labels": b["labels"][i]} for b in [_batch(64, seed=1)] for i in range(64)]

    def collate(xs):
        return {k: torch.stack([x[k] for x in xs]) for k in xs[0]}

    eval_batch = collate(items)
    wrapped.eval()
    with torch.no_grad():
        before = wrapped(**eval_batch).loss.item()
    hist = train(wrapped, items, TrainConfig(steps=30, lr=3e-2, batch_size=16, warmup_steps=1,
                                             progress=False), collate)
    wrapped.eval()
    with torch.no_grad():
        after = wrapped(**eval_batch).loss.item()
    assert hist.trainable_params == 32 + 32 * 2 + 2
    assert after < before - 0.05
    assert wrapped.z.abs().sum() > 0


def test_merged_model_equals_the_wrapped_forward(tiny_bert):
    batch = _batch()
    wrapped = IntrinsicModel(tiny_bert, d=4, seed=0).eval()
    with torch.no_grad():
        wrapped.z.copy_(torch.tensor([0.01, -0.02, 0.03, 0.0]))
        expected = wrapped(**batch).logits
        merged = wrapped.merged_model()
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(wrapped.z, torch.zeros(4))  # theta0 is now the merged weights
        torch.testing.assert_close(wrapped(**batch).logits, expected, atol=1e-6, rtol=1e-6)
    assert merged is tiny_bert


def test_d_zero_trains_only_the_head(tiny_bert):
    wrapped = IntrinsicModel(tiny_bert, d=0)
    assert wrapped.projection is None
    assert intrinsic.intrinsic_trainable(wrapped) == 32 * 2 + 2


@pytest.mark.parametrize("d", [-1, 1.5, True])
def test_bad_d_raises(tiny_bert, d):
    with pytest.raises(ValueError, match="d must be"):
        IntrinsicModel(tiny_bert, d=d)


def test_unknown_train_directly_raises(tiny_bert):
    with pytest.raises(ValueError, match="not modules"):
        IntrinsicModel(tiny_bert, d=3, train_directly=("head",))


def test_fraction_of_full_and_smallest_d():
    assert intrinsic.fraction_of_full(0.7, 0.8) == pytest.approx(0.875)
    assert intrinsic.fraction_of_full(0.7, 0.8, floor=0.5) == pytest.approx(2 / 3)
    scores = {10: 0.55, 100: 0.66, 1000: 0.76, 5000: 0.78}
    assert intrinsic.smallest_d(scores, 0.8) == 1000  # 0.66 / 0.8 = 0.825 < 0.9
    assert intrinsic.smallest_d(scores, 0.8, fraction=0.8) == 100
    assert intrinsic.smallest_d(scores, 0.8, floor=0.5) == 5000  # (0.76 - 0.5) / 0.3 < 0.9
    assert intrinsic.smallest_d({10: 0.5}, 0.8) is None
    with pytest.raises(ValueError):
        intrinsic.fraction_of_full(0.5, 0.5, floor=0.5)
