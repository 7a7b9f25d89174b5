"""DoRA (lorabook.lora.DoRALinear) against peft 0.21's use_dora=True, with B and m non-zero.

Tolerances: fp32 throughout; forward and gradients at 1e-5 as for LoRA (test_lora.py): the two
compute the same sums in a different order (peft builds B A through an identity matrix, we use
B @ A), which moves the last bits only.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lorabook.lora import (
    DoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lorabook.quant import LinearNF4

peft = pytest.importorskip("peft")

ATOL = 1e-5


def _randomize(model: nn.Module, seed: int) -> None:
    """Random A, B and a magnitude m moved away from ||W0||, so every term of DoRA shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.A.copy_(torch.randn(layer.A.shape, generator=g) * 0.2)
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.2)
            layer.magnitude.mul_(1 + 0.3 * torch.rand(layer.magnitude.shape, generator=g))


def _pair(base: nn.Module, targets, r=4, alpha=8, dropout=0.0, seed=0):
    """Our DoRA model and peft's twin holding the same A, B and m."""
    ours = apply_lora(copy.deepcopy(base), targets, r=r, alpha=alpha, dropout=dropout,
                      use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_dora=True))
    # at creation, before any copy, both magnitudes are ||W0|| per output row
    for name, layer in lora_layers(ours):
        theirs = twin.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(layer.magnitude, theirs, atol=1e-6, rtol=0)
    _randomize(ours, seed)
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.A)
            theirs.lora_B["default"].weight.copy_(layer.B)
            theirs.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return ours, twin


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


CASES = [("tiny_llama", ["q_proj", "v_proj"]), ("tiny_llama", "all-linear"),
         ("tiny_bert", "all-linear")]  # BERT's linears have biases: the bias path of DoRA


def test_single_layer_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)  # W0 (5, 6), b (5,)
    layer = DoRALinear(base, r=2, alpha=4)
    with torch.no_grad():
        layer.B.copy_(torch.randn(5, 2))
        layer.magnitude.copy_(torch.rand(5) + 0.5)
    x = torch.randn(3, 6)  # (batch, in)
    V = base.weight + 2.0 * layer.B @ layer.A  # direction (5, 6), scaling 4 / 2
    W = layer.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)  # m V / ||V||_c
    torch.testing.assert_close(layer(x), x @ W.T + base.bias, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name,targets", CASES[1:])
def test_forward_and_gradients_match_peft(request, model_name, targets):
    base = request.getfixturevalue(model_name)
    ours, twin = _pair(base, targets)
    x = _inputs(base)
    mine, theirs_out = ours(**x).logits, twin(**x).logits
    torch.testing.assert_close(mine, theirs_out, atol=ATOL, rtol=0)
    mine.pow(2).mean().backward()
    theirs_out.pow(2).mean().backward()
    for name, layer in lora_layers(ours):
        theirs = twin.base_model.model.get_submodule(name)
        for p, q in [(layer.A, theirs.lora_A["default"].weight),
                     (layer.B, theirs.lora_B["default"].weight),
                     (layer.magnitude, theirs.lora_magnitude_vector["default"].weight)]:
            torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=1e-4)
        assert layer.base_layer.weight.grad is None  # W0 frozen


def test_dropout_path_matches_peft(tiny_llama):
    """In training with dropout, W0 x is recomputed on the dropped-out input, as in peft."""
    ours, twin = _pair(tiny_llama, ["q_proj", "v_proj"], dropout=0.3)
    ours.train(), twin.train()
    x = _inputs(tiny_llama)
    torch.manual_seed(7)
    mine = ours(**x).logits
    torch.manual_seed(7)  # the same masks, drawn in the same order
    torch.testing.assert_close(mine, twin(**x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_name,targets", CASES[1:])
def test_merge_and_unmerge_match_peft(request, model_name, targets):
    base = request.getfixturevalue(model_name)
    ours, twin = _pair(base, targets)
    x = _inputs(base)
    w0 = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(ours)}
    with torch.no_grad():
        unmerged = ours(**x).logits
        merge_lora(ours)
        twin.merge_adapter()
        merged = ours(**x).logits
    for name, layer in lora_layers(ours):
        theirs = twin.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(layer.base_layer.weight, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
    unmerge_lora(ours)
    twin.unmerge_adapter()
    for name, layer in lora_layers(ours):
        theirs = twin.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(layer.base_layer.weight, theirs, atol=1e-6, rtol=0)
        assert (layer.base_layer.weight - w0[name]).abs().max() < 1e-5


def test_trainable_parameters_match_peft(tiny_llama):
    ours, twin = _pair(tiny_llama, ["q_proj", "v_proj"])
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == twin.get_nb_trainable_parameters()[0]
    # 2 layers x (q: A 4x32 + B 32x4 + m 32, v: A 4x32 + B 16x4 + m 16)
    assert trainable == 2 * (4 * 32 + 32 * 4 + 32 + 4 * 32 + 16 * 4 + 16)


def test_adapter_round_trip_with_peft(tiny_llama, tmp_path):
    """Ours saved -> peft loads it; peft's saved -> we load it; same logits, magnitude included."""
    ours, twin = _pair(tiny_llama, ["q_proj", "v_proj"])
    x = _inputs(tiny_llama)
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama),
                                                str(tmp_path / "ours")).eval()
        twin.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        want = ours(**x).logits
        torch.testing.assert_close(loaded(**x).logits, want, atol=ATOL, rtol=0)
        mine = load_adapter(copy.deepcopy(tiny_llama), tmp_path / "peft")
        assert all(isinstance(layer, DoRALinear) for _, layer in lora_layers(mine))
        torch.testing.assert_close(mine(**x).logits, want, atol=ATOL, rtol=0)
    plain = apply_lora(copy.deepcopy(tiny_llama), ["q_proj", "v_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="DoRA adapter"):
        load_adapter(plain, tmp_path / "peft")
    assert any(k.endswith("lora_magnitude_vector") for k in lora_state_dict(mine))


def test_quantized_base_trains_but_does_not_merge():
    torch.manual_seed(0)
    dense = nn.Linear(64, 16)
    layer = DoRALinear(LinearNF4.from_linear(dense, double_quant=False), r=2, alpha=4)
    W0 = layer.base_layer.dequantized_weight(torch.float32)  # (16, 64): Q(W0)
    torch.testing.assert_close(layer.magnitude, W0.norm(dim=1), atol=1e-6, rtol=0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=1e-6, rtol=0)  # B = 0: W0
    layer(x).sum().backward()
    assert layer.magnitude.grad is not None and layer.A.grad is not None
    with pytest.raises(TypeError, match="dequantize"):
        layer.merge()


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="r must be"):
        apply_lora(copy.deepcopy(tiny_llama), ["q_proj"], r=0, alpha=8, use_dora=True)
    with pytest.raises(TypeError, match="LoRALinear wraps"):
        DoRALinear(nn.ReLU(), r=2, alpha=2)
    model = apply_lora(copy.deepcopy(tiny_llama), ["q_proj"], r=2, alpha=2, use_dora=True)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
