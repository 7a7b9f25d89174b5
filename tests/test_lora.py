"""lorabook.lora against peft 0.21 as the oracle, with B non-zero (peft's tests use atol 1e-4)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorabook.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    get_lora_config,
    lora_layers,
    lora_state_dict,
    merge_lora,
    swap_adapter,
    unmerge_lora,
)

peft = pytest.importorskip("peft")

ATOL = 1e-5


def _randomize(model: nn.Module, seed: int) -> None:
    """Give every LoRA layer a random A and a non-zero B (at init B = 0 hides most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.A.copy_(torch.randn(layer.A.shape, generator=g) * 0.2)
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.2)


def _peft_twin(ours: nn.Module, base: nn.Module, **config) -> nn.Module:
    """Wrap a copy of base with peft using config, and copy our A and B into its lora_A/lora_B."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.A)
            theirs.lora_B["default"].weight.copy_(layer.B)
    return twin


def _pair(base: nn.Module, targets, r=4, alpha=8, use_rslora=False, seed=0):
    ours = apply_lora(copy.deepcopy(base), targets, r=r, alpha=alpha, use_rslora=use_rslora)
    _randomize(ours, seed)
    twin = _peft_twin(ours, base, r=r, lora_alpha=alpha, target_modules=targets,
                      use_rslora=use_rslora)
    return ours, twin


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # some padding, so masks are exercised too
    return {"input_ids": ids, "attention_mask": mask}


MODELS = ["tiny_llama", "tiny_bert"]
TARGETS = {"tiny_llama": [["q_proj", "v_proj"], "all-linear"],
           "tiny_bert": [["query", "value"], "all-linear"]}
CASES = [(m, t) for m in MODELS for t in TARGETS[m]]


@pytest.mark.parametrize("model_name,targets", CASES)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_peft(request, model_name, targets, use_rslora):
    base = request.getfixturevalue(model_name)
    ours, twin = _pair(base, targets, r=4, alpha=8, use_rslora=use_rslora)
    x = _inputs(base)
    with torch.no_grad():
        got, want, plain = ours(**x).logits, twin(**x).logits, base(**x).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the adapter really changes the output
    expected = 8 / math.sqrt(4) if use_rslora else 8 / 4
    for name, layer in lora_layers(ours):
        assert layer.scaling == pytest.approx(expected)
        theirs = twin.base_model.model.get_submodule(name)
        assert theirs.scaling["default"] == pytest.approx(expected)


@pytest.mark.parametrize("model_name,targets", CASES)
def test_target_names_match_peft(request, model_name, targets):
    base = request.getfixturevalue(model_name)
    ours, twin = _pair(base, targets)
    assert sorted(n for n, _ in lora_layers(ours)) == sorted(twin.targeted_module_names)
    assert set(lora_state_dict(ours)) == set(peft.get_peft_model_state_dict(twin))


def test_regex_target_matches_peft(tiny_llama):
    pattern = r".*\.mlp\.(gate|up)_proj"
    ours, twin = _pair(tiny_llama, pattern)
    names = sorted(n for n, _ in lora_layers(ours))
    assert names == sorted(twin.targeted_module_names) and len(names) == 4


@pytest.mark.parametrize("model_name,targets", CASES)
def test_gradients_match_peft(request, model_name, targets):
    base = request.getfixturevalue(model_name)
    ours, twin = _pair(base, targets)
    x = _inputs(base)
    ours(**x).logits.pow(2).mean().backward()
    twin(**x).logits.pow(2).mean().backward()
    for name, layer in lora_layers(ours):
        theirs = twin.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.A.grad, theirs.lora_A["default"].weight.grad,
                                   atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(layer.B.grad, theirs.lora_B["default"].weight.grad,
                                   atol=ATOL, rtol=1e-4)
        assert layer.base_layer.weight.grad is None  # W0 frozen


def test_only_lora_factors_train(tiny_llama):
    ours, twin = _pair(tiny_llama, ["q_proj", "v_proj"])
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n, _ in lora_layers(ours) for p in ("A", "B")}
    assert count_parameters(ours) == twin.get_nb_trainable_parameters()
    # 2 layers x (q: 4x32 + 32x4, v: 4x32 + 16x4)
    assert count_parameters(ours)[0] == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)


@pytest.mark.parametrize("model_name,targets", CASES)
def test_merged_weights_match_peft(request, model_name, targets):
    base = request.getfixturevalue(model_name)
    ours, twin = _pair(base, targets)
    x = _inputs(base)
    with torch.no_grad():
        unmerged = ours(**x).logits
        merge_lora(ours)
        twin.merge_adapter()
        merged = ours(**x).logits
    for name, layer in lora_layers(ours):
        assert layer.merged
        theirs = twin.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(layer.base_layer.weight, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)


def test_merge_unmerge_restores_w0_fp32(tiny_llama):
    ours, _ = _pair(tiny_llama, "all-linear")
    w0 = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(ours)}
    unmerge_lora(merge_lora(ours))
    for name, layer in lora_layers(ours):
        assert not layer.merged
        assert (layer.base_layer.weight - w0[name]).abs().max() < 1e-6


def test_bf16_forward_merge_and_round_trip(tiny_llama):
    base = tiny_llama.to(torch.bfloat16)
    ours, twin = _pair(base, ["q_proj", "v_proj"])
    layer = dict(lora_layers(ours))["model.layers.0.self_attn.q_proj"]
    assert layer.A.dtype == torch.float32  # adapters stay fp32, as with peft's autocast
    x = _inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, twin(**x).logits, atol=1e-2, rtol=0)
    w0 = layer.base_layer.weight.clone()
    merge_lora(ours)
    twin.merge_adapter()
    theirs = twin.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.base_layer.weight, theirs.base_layer.weight, atol=0, rtol=0)
    want = (w0.float() + layer.delta_weight()).to(torch.bfloat16)  # one fp32 add, one rounding
    torch.testing.assert_close(layer.base_layer.weight, want, atol=0, rtol=0)
    unmerge_lora(ours)
    # bf16 keeps 8 significant bits: the round trip is exact up to about one ulp of |W|
    err = (layer.base_layer.weight.float() - w0.float()).abs()
    ulp = torch.maximum(w0.float().abs(), layer.delta_weight().abs()) * 2.0**-7
    assert bool((err <= ulp + 1e-6).all())


def test_init_follows_peft():
    base = nn.Linear(20, 12)
    torch.manual_seed(7)
    layer = LoRALinear(base, r=3, alpha=6)
    torch.manual_seed(7)
    ref = torch.empty(3, 20)
    nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
    assert layer.A.shape == (3, 20) and layer.B.shape == (12, 3)
    torch.testing.assert_close(layer.A.detach(), ref, atol=0, rtol=0)
    assert bool((layer.B == 0).all()) and layer.scaling == 2.0
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)  # starts exactly at W0
    assert not base.weight.requires_grad and layer.A.requires_grad and layer.B.requires_grad


def test_single_layer_formula_and_delta_weight():
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=3)
    with torch.no_grad():
        layer.B.copy_(torch.randn(5, 2))
    x = torch.randn(4, 6)
    want = layer.base_layer(x) + 1.5 * x @ layer.A.T @ layer.B.T
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), 1.5 * layer.B @ layer.A)


def test_dropout_only_on_lora_branch():
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=4, dropout=0.5).train()
    x = torch.randn(32, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0: dropout cannot show
    with torch.no_grad():
        layer.B.copy_(torch.randn(8, 4))
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    want = layer.base_layer(x) + layer.scaling * dropped @ layer.A.T @ layer.B.T
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    full = layer.base_layer(x) + layer.scaling * x @ layer.A.T @ layer.B.T
    assert (got - full).abs().max() > 1e-3  # dropout did act in train mode
    torch.testing.assert_close(layer.eval()(x), full, atol=1e-6, rtol=0)  # and not in eval


class _FakeQuantLinear(nn.Module):
    """A stand-in for a quantized linear: int8 codes, a scale, in/out_features, no float weight."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.randint(-127, 128, (out_features, in_features),
                                                    dtype=torch.int8))
        self.scale = 0.01

    def forward(self, x):
        return F.linear(x, self.codes.float() * self.scale)


def test_quantized_like_base_trains_but_does_not_merge():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = _FakeQuantLinear(8, 6)

        def forward(self, x):
            return self.proj(x)

    net = apply_lora(Net(), ["proj"], r=2, alpha=4)
    layer = net.proj
    with torch.no_grad():
        layer.B.copy_(torch.randn(6, 2))
    x = torch.randn(3, 8)
    want = layer.base_layer(x) + 2.0 * x @ layer.A.T @ layer.B.T
    torch.testing.assert_close(net(x), want, atol=1e-6, rtol=0)
    net(x).sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None
    with pytest.raises(TypeError, match="dequantize"):
        merge_lora(net)
    assert not layer.merged


def test_wraps_lorabook_nf4_layers(tiny_llama):
    quant = pytest.importorskip("lorabook.quant")
    if not hasattr(quant, "quantize_model"):
        pytest.skip("lorabook.quant.quantize_model is not written yet")
    model = copy.deepcopy(tiny_llama)
    returned = quant.quantize_model(model)
    model = returned if isinstance(returned, nn.Module) else model
    assert not isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    x = _inputs(tiny_llama)
    with torch.no_grad():
        quantized = model(**x).logits
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, quantized, atol=0, rtol=0)  # B = 0
    _randomize(model, 0)
    logits = model(**x).logits
    assert (logits - quantized).abs().max() > 1e-3
    logits.pow(2).mean().backward()
    assert all(layer.A.grad is not None for _, layer in lora_layers(model))
    with pytest.raises(TypeError, match="dequantize"):
        merge_lora(model)


def test_merge_state_errors(tiny_llama):
    model = apply_lora(tiny_llama, ["q_proj"], r=2, alpha=2)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    layer = next(layer for _, layer in lora_layers(model))
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


@pytest.mark.parametrize("kwargs,error,match", [
    ({"target_modules": ["nope"]}, ValueError, "matched no module"),
    ({"target_modules": ["q_proj", "nope"]}, ValueError, "nope"),
    ({"target_modules": r".*\.nope"}, ValueError, "matched no module"),
    ({"target_modules": []}, ValueError, "non-empty"),
    ({"target_modules": ["embed_tokens"]}, TypeError, "not a linear layer"),
    ({"target_modules": ["self_attn"]}, TypeError, "not a linear layer"),
    ({"r": 0}, ValueError, "r must be >= 1"),
    ({"r": 2.5}, TypeError, "r must be an int"),
    ({"alpha": 0}, ValueError, "alpha"),
    ({"dropout": 1.0}, ValueError, "dropout"),
])
def test_apply_lora_rejects_bad_input(tiny_llama, kwargs, error, match):
    args = {"target_modules": ["q_proj"], "r": 4, "alpha": 8, **kwargs}
    with pytest.raises(error, match=match):
        apply_lora(tiny_llama, **args)
    assert not list(lora_layers(tiny_llama))  # nothing was half-applied
    assert all(p.requires_grad for p in tiny_llama.parameters())


def test_other_errors(tiny_llama):
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Embedding(10, 4), r=2, alpha=2)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(tiny_llama)
    apply_lora(tiny_llama, ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(tiny_llama, ["v_proj"], r=2, alpha=2)


def test_config_recorded(tiny_llama):
    model = apply_lora(tiny_llama, "all-linear", r=2, alpha=4, use_rslora=True)
    config = get_lora_config(model)
    assert (config.r, config.alpha, config.use_rslora) == (2, 4, True)
    assert "lm_head" not in config.target_modules and len(config.target_modules) == 14


def test_swap_merged_adapters_and_back(tiny_llama):
    model = apply_lora(tiny_llama, ["q_proj", "v_proj"], r=4, alpha=8)
    w0 = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(model)}
    _randomize(model, 1)
    first = {k: v.clone() for k, v in lora_state_dict(model).items()}
    _randomize(model, 2)
    second = {k: v.clone() for k, v in lora_state_dict(model).items()}
    x = _inputs(model)
    with torch.no_grad():
        logits_second = model(**x).logits
    swap_adapter(model, first)
    merge_lora(model)
    merged_first = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(model)}
    for name, layer in lora_layers(model):
        want = w0[name] + layer.delta_weight()
        torch.testing.assert_close(layer.base_layer.weight, want, atol=1e-6, rtol=0)
    swap_adapter(model, second)  # unmerge BA, load B'A', merge B'A'
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, logits_second, atol=ATOL, rtol=0)
    swap_adapter(model, first)
    for name, layer in lora_layers(model):
        assert layer.merged
        assert (layer.base_layer.weight - merged_first[name]).abs().max() < 1e-6
    unmerge_lora(model)
    for name, layer in lora_layers(model):
        assert (layer.base_layer.weight - w0[name]).abs().max() < 1e-6


@pytest.mark.slow
def test_real_base_model_matches_peft():
    models = pytest.importorskip("lorabook.models")
    try:
        model, tokenizer = models.load_lm(dtype=torch.float32, device="cpu")
    except ImportError as missing:  # models.ModelPackageMissing: the offline package is absent
        pytest.skip(str(missing))
    base = copy.deepcopy(model)
    ours = apply_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)
    _randomize(ours, 0)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            layer.B.mul_(0.1)  # real activations are large; keep the update a perturbation
    twin = _peft_twin(ours, base, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    ids = tokenizer("LoRA freezes W0 and trains B A.", return_tensors="pt")
    with torch.no_grad():
        got, want = ours(**ids).logits, twin(**ids).logits
        plain = base(**ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_peft(tiny_llama, tmp_path):
    base = tiny_llama.to("cuda", torch.bfloat16)
    ours, twin = _pair(base, "all-linear")
    layer = dict(lora_layers(ours))["model.layers.1.mlp.down_proj"]
    assert layer.A.device.type == "cuda" and layer.A.dtype == torch.float32
    x = {k: v.cuda() for k, v in _inputs(base).items()}
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, twin(**x).logits, atol=2e-2, rtol=0)
    from lorabook.lora import save_adapter

    save_adapter(ours, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, twin(**x).logits, atol=2e-2, rtol=0)
    w0 = layer.base_layer.weight.clone()
    merge_lora(ours)
    twin.merge_adapter()
    theirs = twin.base_model.model.get_submodule("model.layers.1.mlp.down_proj").base_layer
    torch.testing.assert_close(layer.base_layer.weight, theirs.weight, atol=0, rtol=0)
    unmerge_lora(ours)
    err = (layer.base_layer.weight.float() - w0.float()).abs()
    assert bool((err <= torch.maximum(w0.float().abs(), layer.delta_weight().abs()) * 2.0**-7
                 + 1e-6).all())
