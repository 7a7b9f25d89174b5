"""LinearNF4 and quantize_model: against F.linear on the dequantized weight and bnb Linear4bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorabook.quant import (
    LinearNF4,
    bits_per_parameter,
    dense_weights,
    dequantize_nf4,
    quantize_model,
    quantize_nf4,
    quantized_bytes,
)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(128, 48)  # in_features a multiple of the blocksize: see bnb_linear


def bnb_linear(linear: nn.Linear, double_quant: bool) -> nn.Module:
    """bitsandbytes' Linear4bit with the same weights (Params4bit quantizes when moved)."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                              quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                     quant_type="nf4", blocksize=64,
                                     compress_statistics=double_quant)
    layer.bias = nn.Parameter(linear.bias.detach().clone())
    return layer.to("cpu")  # the move runs quantize_4bit, on CPU too


@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_is_linear_on_dequantized_weight(linear, double_quant):
    layer = LinearNF4.from_linear(linear, blocksize=64, double_quant=double_quant)
    packed, state = quantize_nf4(linear.weight.detach(), 64, double_quant)
    assert torch.equal(layer.weight_packed, packed)
    W = dequantize_nf4(packed, state)
    assert torch.equal(layer.dequantized_weight(), W)
    x = torch.randn(3, 5, 128)
    assert torch.equal(layer(x), F.linear(x, W, linear.bias))
    assert layer(x).shape == (3, 5, 48)


@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes_linear4bit(linear, double_quant):
    ours = LinearNF4.from_linear(linear, blocksize=64, double_quant=double_quant)
    theirs = bnb_linear(linear, double_quant)
    assert torch.equal(theirs.weight.data, ours.weight_packed)
    # inputs that require grad take bnb's MatMul4Bit path on every CPU
    x = torch.randn(6, 128, requires_grad=True)
    x_bnb = x.detach().clone().requires_grad_(True)
    y, y_bnb = ours(x), theirs(x_bnb)
    assert torch.equal(y, y_bnb)
    y.square().sum().backward()
    y_bnb.square().sum().backward()
    assert torch.allclose(x.grad, x_bnb.grad, rtol=1e-5, atol=1e-6)


def test_frozen_but_gradients_reach_the_input(linear):
    layer = LinearNF4.from_linear(linear)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.weight_packed.dtype == torch.uint8
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    W = layer.dequantized_weight()
    assert torch.allclose(x.grad, W.sum(dim=0).expand(4, -1), atol=1e-5)
    assert layer.bias.grad is None


def test_compute_dtype_and_dtype_casts(linear):
    layer = LinearNF4.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    W16 = layer.dequantized_weight(torch.bfloat16)
    assert torch.equal(y, F.linear(x.bfloat16(), W16, linear.bias.bfloat16()).float())
    # casting the module must not round its quantization state
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.absmax.dtype == torch.uint8 and half.codebook.dtype == torch.float32
    assert half.absmax_offset.dtype == torch.float32 and half.bias.dtype == torch.bfloat16
    assert torch.equal(half.dequantized_weight(), layer.dequantized_weight())


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        LinearNF4.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        LinearNF4.from_linear(nn.Linear(8, 8), blocksize=100)
    with pytest.raises(ValueError, match="from_linear"):
        quantize_model(nn.Linear(8, 8))


def test_quantize_model_swaps_decoder_linears(tiny_llama):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tiny_llama(ids).logits
    before = quantized_bytes(tiny_llama)
    model = quantize_model(copy.deepcopy(tiny_llama))
    swapped = {name for name, m in model.named_modules() if isinstance(m, LinearNF4)}
    expected = {name for name, m in tiny_llama.named_modules()
                if isinstance(m, nn.Linear) and name != "lm_head"}
    assert swapped == expected and len(swapped) == 14  # 7 per decoder layer
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    decoder = model.model.layers
    assert not any(isinstance(m, nn.Linear) for m in decoder.modules())
    with torch.no_grad():
        logits = model(ids).logits
    cosine = F.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99 and (logits - reference).abs().max() < 0.1
    assert quantized_bytes(model) < 0.6 * before


def test_quantize_model_skip_and_bits(tiny_llama):
    model = quantize_model(copy.deepcopy(tiny_llama), skip=(), double_quant=False)
    assert isinstance(model.lm_head, LinearNF4)  # asked for
    assert type(model.model.embed_tokens) is nn.Embedding  # never a Linear
    layer = model.model.layers[0].mlp.down_proj
    assert bits_per_parameter(layer.quant_state, layer.weight_packed) == pytest.approx(4.5)
    model = quantize_model(copy.deepcopy(tiny_llama), skip=("lm_head", "down_proj"))
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, LinearNF4)


def test_quantized_bytes_counts_stored_tensors(linear):
    layer = LinearNF4.from_linear(linear, double_quant=False)
    n = 128 * 48
    expected = n // 2 + 4 * (n // 64) + 4 * 16 + 4 * 48  # codes, absmax, codebook, bias
    assert quantized_bytes(layer) == expected
    assert quantized_bytes(linear) == 4 * (n + 48)


def test_dense_weights_dequantizes_once_and_gives_the_same_outputs(tiny_llama, monkeypatch):
    from lorabook.qlora import recompute_in_backward

    model = recompute_in_backward(quantize_model(copy.deepcopy(tiny_llama)))
    layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    calls = []
    original = LinearNF4.dequantized_weight
    monkeypatch.setattr(LinearNF4, "dequantized_weight",
                        lambda self, dtype=None: calls.append(self) or original(self, dtype))
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 7))
    with torch.no_grad():
        plain = [model(input_ids=ids).logits for _ in range(3)]
        assert len(calls) == 3 * len(layers)  # every forward dequantizes every layer
        calls.clear()
        with dense_weights(model):
            held = [model(input_ids=ids).logits for _ in range(3)]
        assert len(calls) == len(layers)  # once per layer for the three forwards
    assert all(torch.equal(a, b) for a, b in zip(plain, held, strict=True))  # bit-identical
    assert all(m._dense is None for m in layers)  # the dense copies are dropped at the end
    with pytest.raises(RuntimeError, match="boom"), dense_weights(model):
        raise RuntimeError("boom")
    assert all(m._dense is None for m in layers)  # also when the block raises
