"""VeRA (lorabook.vera) against peft 0.21's VeraConfig with the same projection seed, fp32.

The shared A and B come from the same generator calls, so they are equal bit for bit; forward,
gradients and merged weights at 1e-5 / 1e-6 as for LoRA (test_lora.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lorabook.vera import VeRALinear, apply_vera, vera_layers

peft = pytest.importorskip("peft")

ATOL = 1e-5
CASES = [("tiny_llama", ["q_proj", "v_proj", "down_proj"]), ("tiny_bert", ["query", "value"])]


def _pair(base: nn.Module, targets, r=8, key=3):
    ours = apply_vera(copy.deepcopy(base), targets, r=r, projection_prng_key=key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(
            r=r, target_modules=targets, projection_prng_key=key))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in vera_layers(ours):
            theirs = twin.base_model.model.get_submodule(name)
            assert torch.equal(layer.lambda_d, theirs.vera_lambda_d["default"])  # d_initial
            assert torch.equal(layer.lambda_b, theirs.vera_lambda_b["default"])  # zeros
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=g))
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g))
            theirs.vera_lambda_d["default"].copy_(layer.lambda_d)
            theirs.vera_lambda_b["default"].copy_(layer.lambda_b)
    return ours, twin


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("model_name,targets", CASES)
def test_projections_forward_gradients_and_merge_match_peft(request, model_name, targets):
    base = request.getfixturevalue(model_name)
    ours, twin = _pair(base, targets)
    (_, first), = [next(vera_layers(ours))]
    assert torch.equal(first.projections.A, twin.base_model.vera_A["default"])  # (r, in_max)
    assert torch.equal(first.projections.B, twin.base_model.vera_B["default"])  # (out_max, r)
    assert all(layer.projections is first.projections for _, layer in vera_layers(ours))
    x = _inputs(base)
    mine, theirs_out = ours(**x).logits, twin(**x).logits
    torch.testing.assert_close(mine, theirs_out, atol=ATOL, rtol=0)
    mine.pow(2).mean().backward()
    theirs_out.pow(2).mean().backward()
    for name, layer in vera_layers(ours):
        theirs = twin.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lambda_d.grad, theirs.vera_lambda_d["default"].grad,
                                   atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(layer.lambda_b.grad, theirs.vera_lambda_b["default"].grad,
                                   atol=ATOL, rtol=1e-4)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == twin.get_nb_trainable_parameters()[0]
    with torch.no_grad():
        for _, layer in vera_layers(ours):
            layer.merge()
        twin.merge_adapter()
        torch.testing.assert_close(ours(**x).logits, mine, atol=ATOL, rtol=0)
    for name, layer in vera_layers(ours):
        theirs = twin.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(layer.base_layer.weight, theirs, atol=1e-6, rtol=0)


def test_single_layer_formula_and_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    apply_vera(model, ["0", "2"], r=3)
    first, second = model[0], model[2]
    assert first.projections.A.shape == (3, 6) and first.projections.B.shape == (5, 3)
    with torch.no_grad():
        second.lambda_b.copy_(torch.randn(4))
    h = torch.randn(2, 5)  # (batch, in) of the second layer
    A, B = second.projections.A[:, :5], second.projections.B[:4]  # sliced (3, 5), (4, 3)
    want = second.base_layer(h) + second.lambda_b * ((h @ A.T * second.lambda_d) @ B.T)
    torch.testing.assert_close(second(h), want, atol=1e-6, rtol=0)
    # trained: r + out per layer = (3 + 5) + (3 + 4); A and B are buffers, not parameters
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 15
    assert "projections.A" not in "".join(model.state_dict())  # not saved with the model


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="r must be"):
        apply_vera(copy.deepcopy(tiny_llama), ["q_proj"], r=0)
    with pytest.raises(ValueError, match="matched no module"):
        apply_vera(copy.deepcopy(tiny_llama), ["nope"], r=2)
    model = apply_vera(copy.deepcopy(tiny_llama), ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already has adapter"):
        apply_vera(model, ["v_proj"], r=2)
    small = model.model.layers[0].self_attn.q_proj.projections
    with pytest.raises(ValueError, match="too small"):
        VeRALinear(nn.Linear(64, 8), small)
    with pytest.raises(TypeError, match="nn.Linear"):
        VeRALinear(nn.ReLU(), small)
    layer = model.model.layers[0].self_attn.q_proj
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
