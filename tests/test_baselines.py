"""lorabook.baselines: bottleneck adapters and prefix tuning, checked against the frozen base model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabook.baselines import (
    AdaptedLinear,
    BottleneckAdapter,
    PrefixTuning,
    adapter_parameter_count,
    adapter_parameters,
    add_adapters,
    context_budget,
    positions_taken,
    remove_adapters,
)

D, LAYERS = 32, 2  # tiny_llama / tiny_bert hidden size and depth


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(3, 128, (3, 9))  # (B, T)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- adapter layer


def test_bottleneck_adapter_identity_at_init_and_closed_form_size():
    ad = BottleneckAdapter(D, 4, nonlinearity="gelu")
    x = torch.randn(2, 5, D)
    assert torch.equal(ad(x), x)  # up = 0: the adapter starts as the identity
    assert sum(p.numel() for p in ad.parameters()) == adapter_parameter_count(D, 4) == 2 * D * 4 + 4 + D
    ad_ln = BottleneckAdapter(D, 4, layer_norm=True)  # Lin et al.: LayerNorm on the input
    assert torch.equal(ad_ln(x), x)
    assert sum(p.numel() for p in ad_ln.parameters()) == adapter_parameter_count(D, 4, True)
    assert adapter_parameter_count(D, 4, True) == adapter_parameter_count(D, 4) + 2 * D


@pytest.mark.parametrize("kwargs, match", [
    ({"bottleneck": 0}, "bottleneck"), ({"bottleneck": 2.0}, "bottleneck"),
    ({"nonlinearity": "tanh"}, "nonlinearity"),
])
def test_bottleneck_adapter_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BottleneckAdapter(D, **{"bottleneck": 4, **kwargs})


# ----------------------------------------------------------------------------- add / remove


@pytest.mark.parametrize("placement, per_block", [("houlsby", 2), ("lin", 1)])
def test_add_adapters_llama_starts_at_base_and_counts(tiny_llama, tokens, placement, per_block):
    base_logits = tiny_llama(tokens).logits
    add_adapters(tiny_llama, bottleneck=4, placement=placement)
    assert torch.equal(tiny_llama(tokens).logits, base_logits)
    n_adapters = sum(isinstance(m, BottleneckAdapter) for m in tiny_llama.modules())
    assert n_adapters == per_block * LAYERS
    n_trainable = sum(p.numel() for p in trainable(tiny_llama))
    assert n_trainable == per_block * LAYERS * adapter_parameter_count(D, 4)
    assert {id(p) for p in trainable(tiny_llama)} == {id(p) for p in adapter_parameters(tiny_llama)}
    layer = tiny_llama.model.layers[0]
    assert isinstance(layer.mlp.down_proj, AdaptedLinear)
    assert isinstance(layer.self_attn.o_proj, AdaptedLinear) == (placement == "houlsby")


def test_adapter_training_step_keeps_base_frozen(tiny_llama, tokens):
    base_logits = tiny_llama(tokens).logits.detach()
    add_adapters(tiny_llama, bottleneck=4)
    frozen = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if not p.requires_grad}
    assert frozen and all(".adapter." not in n for n in frozen)
    opt = torch.optim.AdamW(trainable(tiny_llama), lr=1e-2)
    loss = tiny_llama(tokens, labels=tokens).loss
    loss.backward()
    assert all(p.grad is None for n, p in tiny_llama.named_parameters() if n in frozen)
    opt.step()
    for n, p in tiny_llama.named_parameters():
        if n in frozen:
            assert not p.requires_grad and torch.equal(p, frozen[n]), n
    ups = [m.up.weight for m in tiny_llama.modules() if isinstance(m, BottleneckAdapter)]
    assert all(w.abs().sum() > 0 for w in ups)  # the adapters moved away from zero
    assert not torch.allclose(tiny_llama(tokens).logits, base_logits)


def test_perturbed_adapters_change_output_and_remove_restores(tiny_llama, tokens):
    base_logits = tiny_llama(tokens).logits
    add_adapters(tiny_llama, bottleneck=8, placement="lin", nonlinearity="silu")
    with torch.no_grad():
        for m in tiny_llama.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.weight.normal_()
    assert not torch.allclose(tiny_llama(tokens).logits, base_logits, atol=1e-3)
    remove_adapters(tiny_llama)
    assert not any(isinstance(m, AdaptedLinear) for m in tiny_llama.modules())
    assert torch.equal(tiny_llama(tokens).logits, base_logits)
    with pytest.raises(ValueError, match="no adapters"):
        remove_adapters(tiny_llama)


def test_add_adapters_bert_houlsby_with_trainable_head(tiny_bert, tokens):
    base_logits = tiny_bert(tokens).logits
    add_adapters(tiny_bert, bottleneck=4, trainable=("classifier",))
    assert torch.equal(tiny_bert(tokens).logits, base_logits)
    layer = tiny_bert.bert.encoder.layer[0]
    assert isinstance(layer.attention.output.dense, AdaptedLinear)
    assert isinstance(layer.output.dense, AdaptedLinear)
    head = sum(p.numel() for p in tiny_bert.classifier.parameters())
    n_trainable = sum(p.numel() for p in trainable(tiny_bert))
    assert n_trainable == 2 * LAYERS * adapter_parameter_count(D, 4) + head


def test_adapters_follow_the_base_dtype(tiny_llama):
    add_adapters(tiny_llama.to(torch.bfloat16), bottleneck=4)
    assert all(p.dtype == torch.bfloat16 for p in adapter_parameters(tiny_llama))


def test_add_adapters_rejects_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="bottleneck"):
        add_adapters(tiny_llama, bottleneck=0)
    with pytest.raises(ValueError, match="placement"):
        add_adapters(tiny_llama, placement="pfeiffer")
    with pytest.raises(ValueError, match="unsupported model"):
        add_adapters(nn.Sequential(nn.Linear(4, 4)))
    add_adapters(tiny_llama)
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(tiny_llama)


# ----------------------------------------------------------------------------- prefix tuning


def test_prefix_from_real_tokens_equals_base_on_concatenation(tiny_llama, tokens):
    prefix_ids = torch.randint(3, 128, (5,))
    pt = PrefixTuning(tiny_llama, n_prefix=5, init_token_ids=prefix_ids)
    full = torch.cat([prefix_ids.expand(3, -1), tokens], dim=1)  # (B, 5 + T)
    expected = tiny_llama(full).logits[:, 5:]
    torch.testing.assert_close(pt(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    # the loss skips the first input token, which the last prefix position would predict
    labels = full.clone()
    labels[:, :6] = -100
    torch.testing.assert_close(pt(tokens, labels=tokens).loss, tiny_llama(full, labels=labels).loss)


def test_prefix_with_left_padding_matches_each_row(tiny_llama, tokens):
    prefix_ids = torch.randint(3, 128, (4,))
    pt = PrefixTuning(tiny_llama, n_prefix=4, init_token_ids=prefix_ids)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # row 0 is left-padded by 3
    logits = pt(tokens, attention_mask=mask).logits
    for row in range(3):
        real = tokens[row, mask[row].bool()]
        expected = tiny_llama(torch.cat([prefix_ids, real])[None]).logits[0, 4:]
        torch.testing.assert_close(logits[row, mask[row].bool()], expected, atol=1e-5, rtol=1e-5)


def test_zero_length_prefix_is_the_base_model(tiny_llama, tokens):
    pt = PrefixTuning(tiny_llama, n_prefix=0)
    torch.testing.assert_close(pt(tokens).logits, tiny_llama(tokens).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reparameterize", [False, True])
def test_prefix_gradients_reach_only_the_prefix(tiny_llama, tokens, reparameterize):
    pt = PrefixTuning(tiny_llama, n_prefix=3, reparameterize=reparameterize, mlp_hidden=16)
    assert pt.prefix_kv().shape == (LAYERS, 2, 2, 3, 8)  # (L, 2, H_kv, P, head_dim)
    pt(tokens, labels=tokens).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in tiny_llama.parameters())
    own = [p for n, p in pt.named_parameters() if not n.startswith("model.")]
    assert own and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in own)


@pytest.mark.parametrize("reparameterize", [False, True])
def test_prefix_training_lowers_the_loss(tiny_llama, tokens, reparameterize):
    torch.manual_seed(0)
    pt = PrefixTuning(tiny_llama, n_prefix=4, reparameterize=reparameterize, mlp_hidden=32)
    opt = torch.optim.Adam([p for p in pt.parameters() if p.requires_grad], lr=5e-2)
    labels = torch.full_like(tokens, 7)  # a target the prefix alone can learn: always token 7
    losses = []
    for _ in range(15):
        loss = pt(tokens, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25  # ln(128) = 4.85 at the start


def test_prefix_rejects_bad_input(tiny_llama, tiny_bert, tokens):
    with pytest.raises(ValueError, match="n_prefix"):
        PrefixTuning(tiny_llama, n_prefix=129)  # tiny_llama has 128 positions
    with pytest.raises(ValueError, match="n_prefix"):
        PrefixTuning(tiny_llama, n_prefix=-1)
    with pytest.raises(TypeError, match="causal LM"):
        PrefixTuning(tiny_bert, n_prefix=2)
    with pytest.raises(ValueError, match="reparameterize"):
        PrefixTuning(tiny_llama, n_prefix=2, reparameterize=True, init_token_ids=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="token ids"):
        PrefixTuning(tiny_llama, n_prefix=2, init_token_ids=torch.tensor([3, 4, 5]))
    pt = PrefixTuning(tiny_llama, n_prefix=120)
    with pytest.raises(ValueError, match="at most 8 fit"):
        pt(torch.randint(3, 128, (1, 9)))


def test_context_budget_and_positions_taken(tiny_llama):
    budget = context_budget(2048, 256, prompt_lengths=[100, 1792, 2000, 3000])
    assert budget["prompt_positions"] == 1792 and budget["fraction_taken"] == 0.125
    assert budget["prompts_fit_without_prefix"] == 3 and budget["prompts_fit_with_prefix"] == 2
    assert context_budget(tiny_llama, 28)["prompt_positions"] == 100
    assert context_budget(tiny_llama.config, 0)["prompt_positions"] == 128
    with pytest.raises(ValueError, match="exceeds"):
        context_budget(tiny_llama, 129)
    with pytest.raises(TypeError, match="max_position_embeddings"):
        context_budget("gpt2", 4)
    assert positions_taken(tiny_llama) == 0
    pt = PrefixTuning(tiny_llama, n_prefix=6)
    assert positions_taken(pt) == 6
    assert context_budget(pt, 6)["max_positions"] == 128
