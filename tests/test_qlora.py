"""QLoRA helpers: the recomputing 4-bit layer, merging, and memory budgets against real counts."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

from lorabook import bench
from lorabook.lora import LoRALinear, apply_lora, count_parameters, lora_layers, lora_state_dict
from lorabook.qlora import (
    ARCHITECTURES,
    ATTENTION,
    TARGETS,
    LinearNF4Recompute,
    architecture_from_config,
    bnb_quantize_model,
    compare_with_bnb,
    heldout_metrics,
    load_bnb_4bit,
    lora_parameters,
    memory_breakdown,
    memory_budget,
    merge_qlora,
    nf4_bytes,
    parameter_counts,
    qlora_model,
    saved_for_backward_bytes,
)
from lorabook.quant import LinearNF4, quantize_model


def _ids(vocab: int = 128, shape=(2, 12), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    """B is zero after init; a merge test needs delta_W != 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.B.copy_(0.1 * torch.randn(layer.B.shape, generator=g))


def _stored_bytes(model: nn.Module,
                  skip=("codebook", "codebook2", "inv_freq", "original_inv_freq")) -> int:
    """Bytes of distinct parameters and buffers, without codebooks and rotary tables."""
    seen, total = set(), 0
    tensors = [(n, t) for n, t in model.named_parameters()]
    tensors += [(n, t) for n, t in model.named_buffers()]
    for name, t in tensors:
        if name.rsplit(".", 1)[-1] in skip:
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- architectures


# Totals as published for each model (model cards / hub): an independent oracle for the formula.
PUBLISHED_TOTALS = {"SmolLM2-135M": 134_515_008, "SmolLM2-360M": 361_821_120,
                    "SmolLM2-1.7B": 1_711_376_384, "Llama-2-7B": 6_738_415_616,
                    "Mistral-7B": 7_241_732_096}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_parameter_counts_of_published_models(name):
    assert parameter_counts(ARCHITECTURES[name])["total"] == PUBLISHED_TOTALS[name]


def test_parameter_counts_match_tiny_llama(tiny_llama):
    arch = architecture_from_config(tiny_llama.config, "tiny")
    assert arch.tied and arch.kv_heads == 2 and arch.head_dim == 8
    counts = parameter_counts(arch)
    assert counts["total"] == count_parameters(tiny_llama)[1]  # tied lm_head counted once
    linear = sum(m.weight.numel() for n, m in tiny_llama.named_modules()
                 if isinstance(m, nn.Linear) and n != "lm_head")
    assert counts["linear"] == linear


def test_untied_head_is_counted():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    counts = parameter_counts(architecture_from_config(cfg))
    assert counts["lm_head"] == 96 * 32
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_architecture_from_config_rejects_other_models(tiny_bert):
    with pytest.raises(TypeError, match="Llama-style"):
        architecture_from_config(tiny_bert.config)


@pytest.mark.parametrize("targets", [TARGETS, ATTENTION, ("q_proj", "v_proj")])
def test_lora_parameters_match_apply_lora(tiny_llama, targets):
    arch = architecture_from_config(tiny_llama.config)
    apply_lora(tiny_llama, list(targets), r=4, alpha=8)
    assert count_parameters(tiny_llama)[0] == lora_parameters(arch, 4, targets)


def test_lora_parameters_rejects_unknown_target():
    with pytest.raises(ValueError, match="subset"):
        lora_parameters(ARCHITECTURES["SmolLM2-135M"], 8, ["qkv_proj"])


# ----------------------------------------------------------------------------- memory budgets


@pytest.mark.parametrize("shape", [(32, 32), (7, 2359), (192, 576)])  # (out, in)
def test_nf4_bytes_match_quantized_layer(shape):
    layer = LinearNF4.from_linear(nn.Linear(shape[1], shape[0], bias=False))
    n = layer.in_features * layer.out_features
    stored = sum(t.numel() * t.element_size() for name, t in layer.named_buffers()
                 if name not in ("codebook", "codebook2"))
    assert nf4_bytes(n) == stored
    # 4 bits + 8 bits per 64 + 32 bits per 64 * 256 (QLoRA's 0.127 bit/param for the statistics)
    assert abs(8 * nf4_bytes(10**8) / 10**8 - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3


def test_qlora_budget_weights_match_the_tensors(tiny_llama):
    arch = architecture_from_config(tiny_llama.config)
    qlora_model(tiny_llama, r=4, alpha=8)
    budget = memory_budget(arch, "qlora", r=4, weight_bytes=4)  # the fixture is fp32
    assert budget["weights"] == _stored_bytes(tiny_llama)
    assert budget["trainable"] == count_parameters(tiny_llama)[0]


def _adamw_step(model: nn.Module) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values()
               for k, v in s.items() if k != "step")  # "step" is a scalar counter


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_budget_gradients_and_optimizer_match_a_real_step(tiny_llama, method):
    arch = architecture_from_config(tiny_llama.config)
    if method == "full":
        tiny_llama.requires_grad_(True)
    elif method == "lora":
        apply_lora(tiny_llama, list(TARGETS), r=4, alpha=8)
    else:
        qlora_model(tiny_llama, r=4, alpha=8)
    opt = _adamw_step(tiny_llama)
    budget = memory_budget(arch, method, r=4, weight_bytes=4)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in tiny_llama.parameters()
                if p.grad is not None)
    assert budget["gradients"] == grads
    assert budget["optimizer"] == _state_bytes(opt)
    if method != "qlora":
        assert budget["weights"] == bench.model_bytes(tiny_llama, buffers=False)


def test_full_budget_agrees_with_bench_estimate():
    arch = ARCHITECTURES["Llama-2-7B"]
    n = parameter_counts(arch)["total"]
    for wb, master in [(4, False), (2, True)]:
        ours = memory_budget(arch, "full", weight_bytes=wb)
        theirs = bench.training_memory_estimate(n, n, weight_bytes=wb, grad_bytes=wb,
                                                master_weights=master)
        assert ours["total"] == theirs["total"]
        assert ours["bytes_per_param"] == pytest.approx(16.0)


def test_qlora_fits_a_7b_model_in_16_gb_and_lora_does_not():
    arch = ARCHITECTURES["Llama-2-7B"]
    qlora = memory_budget(arch, "qlora", r=64)
    lora = memory_budget(arch, "lora", r=64)
    assert qlora["total"] < 8 * 2**30 < 12 * 2**30 < lora["total"]


def test_memory_budget_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        memory_budget(ARCHITECTURES["SmolLM2-135M"], "prefix")


# ----------------------------------------------------------------------------- the 4-bit base


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_recompute_layer_matches_and_saves_no_dense_weight():
    torch.manual_seed(0)
    plain = LinearNF4.from_linear(nn.Linear(128, 48))
    lean = LinearNF4Recompute.from_nf4(plain)
    assert lean.weight_packed is plain.weight_packed  # same buffers, no copy
    x = torch.randn(3, 5, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_plain = plain(x)
    y_lean = lean(x2)
    assert torch.equal(y_plain, y_lean)
    y_plain.square().sum().backward()
    y_lean.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    dense = 48 * 128  # W0 (out, in) or its transpose, as autograd would keep it
    assert dense in [math.prod(s) for s in _saved_shapes(lambda: plain(x).sum())]
    assert dense not in [math.prod(s) for s in _saved_shapes(lambda: lean(x2).sum())]


def test_recompute_layer_refuses_other_layers():
    with pytest.raises(TypeError, match="LinearNF4"):
        LinearNF4Recompute.from_nf4(nn.Linear(4, 4))


def test_qlora_model_quantizes_and_trains_only_adapters(tiny_llama):
    qlora_model(tiny_llama, r=4, alpha=8)
    layers = dict(lora_layers(tiny_llama))
    assert len(layers) == 2 * len(TARGETS)
    assert all(type(layer.base_layer) is LinearNF4Recompute for layer in layers.values())
    assert isinstance(tiny_llama.lm_head, nn.Linear)  # skipped, still tied to the embedding
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if p.requires_grad}
    _adamw_step(tiny_llama)
    assert any(not torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters()
               if n.endswith(".B"))


# ----------------------------------------------------------------------------- merging


@pytest.fixture
def trained_qlora(tiny_llama):
    original = copy.deepcopy(tiny_llama)
    torch.manual_seed(0)
    qlora_model(tiny_llama, r=4, alpha=8, targets=ATTENTION)
    _randomize_b(tiny_llama)
    return tiny_llama, original


def test_merge_into_quantized_equals_the_unmerged_model(trained_qlora):
    model, _ = trained_qlora
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = merge_qlora(copy.deepcopy(model), into="quantized")
        got = merged(input_ids=ids).logits
    assert not any(isinstance(m, (LoRALinear, LinearNF4)) for m in merged.modules())
    assert torch.allclose(got, expected, atol=1e-5)


def test_merge_into_original_adds_delta_to_w0(trained_qlora):
    model, original = trained_qlora
    layers = dict(lora_layers(model))
    merged = merge_qlora(copy.deepcopy(model), into="original", original=original)
    for name, module in merged.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            W0 = original.get_submodule(name).weight
            delta = layers[name].delta_weight() if name in layers else torch.zeros_like(W0)
            assert torch.allclose(module.weight, W0 + delta, atol=1e-6), name


def test_requantized_merge_is_nf4_of_the_merged_weight(trained_qlora):
    model, _ = trained_qlora
    layers = dict(lora_layers(model))
    merged = merge_qlora(copy.deepcopy(model), into="quantized", requantize=True)
    for name, layer in layers.items():
        new = merged.get_submodule(name)
        assert type(new) is LinearNF4 and new.absmax2 is not None
        W = layer.base_layer.dequantized_weight(torch.float32) + layer.delta_weight()
        ref = LinearNF4.from_linear(_linear_with(W))
        assert torch.equal(new.weight_packed, ref.weight_packed)
    mlp = merged.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(mlp, LinearNF4)  # no adapter there: its 4-bit W0 is kept as it was


def _linear_with(W: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    return layer


def test_merge_qlora_checks_its_arguments(trained_qlora, tiny_bert):
    model, _ = trained_qlora
    with pytest.raises(ValueError, match="quantized"):
        merge_qlora(copy.deepcopy(model), into="W0")
    with pytest.raises(ValueError, match="original"):
        merge_qlora(copy.deepcopy(model), into="original")
    with pytest.raises(ValueError, match="no LoRA"):
        merge_qlora(quantize_model(tiny_bert))


def test_memory_breakdown_adds_up_and_sorts_roles(tiny_llama):
    qlora_model(tiny_llama, r=4, alpha=8)
    parts = memory_breakdown(tiny_llama)
    assert parts["total"] == bench.model_bytes(tiny_llama)
    lora = sum(p.numel() * 4 for p in tiny_llama.parameters() if p.requires_grad)
    assert parts["LoRA A, B"] == lora
    assert parts["embedding / lm_head"] == 128 * 32 * 4  # tied: counted once
    assert parts["dense linear weights"] == 0  # every block linear is in NF4
    n = sum(m.in_features * m.out_features for m in tiny_llama.modules()
            if isinstance(m, LinearNF4))
    assert parts["NF4 codes"] == n // 2


def test_saved_for_backward_sees_the_dense_weight_of_the_plain_layer():
    torch.manual_seed(0)
    plain = LinearNF4.from_linear(nn.Linear(256, 128))
    lean = LinearNF4Recompute.from_nf4(plain)
    x = torch.randn(4, 256, requires_grad=True)
    kept_plain = saved_for_backward_bytes(lambda: plain(x))
    kept_lean = saved_for_backward_bytes(lambda: lean(x))
    assert kept_plain - kept_lean == 128 * 256 * 4  # the fp32 W0, and nothing else
    with torch.no_grad():
        assert saved_for_backward_bytes(lambda: plain(x)) == 0


# ----------------------------------------------------------------------------- bitsandbytes, peft


@pytest.fixture
def llama64():
    """A 2-layer Llama whose layer widths are multiples of the blocksize, as real models' are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_bnb_by_hand_stores_our_bytes(llama64):
    pytest.importorskip("bitsandbytes")
    ours = quantize_model(copy.deepcopy(llama64))
    theirs = bnb_quantize_model(copy.deepcopy(llama64))
    check = compare_with_bnb(ours, theirs)
    assert check["identical"] and check["layers"] == 14


def test_load_bnb_4bit_through_transformers(llama64, tmp_path):
    pytest.importorskip("bitsandbytes")
    llama64.save_pretrained(tmp_path)
    theirs, how = load_bnb_4bit(tmp_path, device="cpu")
    assert how.startswith("transformers")
    assert compare_with_bnb(quantize_model(copy.deepcopy(llama64)), theirs)["identical"]


def _peft_on_bnb(model: nn.Module, ours: nn.Module, targets, eval_first: bool = False,
                 cpu_repacking: bool = False) -> nn.Module:
    """peft's LoRA on bitsandbytes' 4-bit layers, holding our adapters.

    ``eval_first`` runs one eval forward without gradient first, as chapter 6 does before it
    trains or merges: the forward on which bitsandbytes may repack its CPU weights (bnb_cpu).
    """
    import peft

    bnb_model = bnb_quantize_model(model, cpu_repacking=cpu_repacking)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0)
    twin = peft.get_peft_model(bnb_model, cfg)
    result = peft.set_peft_model_state_dict(twin, lora_state_dict(ours))
    assert not result.unexpected_keys
    if eval_first:
        twin.eval()
        with torch.no_grad():
            twin(input_ids=_ids(shape=(1, 6), seed=3))
        twin.train()
    return twin


@pytest.mark.parametrize("eval_first", [False, True])
def test_peft_on_bitsandbytes_computes_our_qlora(llama64, eval_first):
    pytest.importorskip("bitsandbytes")
    ours = qlora_model(copy.deepcopy(llama64), r=4, alpha=8)
    _randomize_b(ours)
    twin = _peft_on_bnb(copy.deepcopy(llama64), ours, TARGETS, eval_first=eval_first)
    ids = _ids(shape=(2, 10))
    loss = ours(input_ids=ids, labels=ids).loss
    loss_twin = twin(input_ids=ids, labels=ids).loss
    assert torch.allclose(loss, loss_twin, atol=1e-6)
    loss.backward()
    loss_twin.backward()
    grads = {n.replace(".default", ""): p.grad for n, p in twin.named_parameters()
             if p.requires_grad}
    for name, layer in lora_layers(ours):
        key = f"base_model.model.{name}.lora_B.weight"
        assert torch.allclose(layer.B.grad, grads[key], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("eval_first", [False, True])
def test_peft_merge_into_4bit_is_our_requantized_merge(llama64, eval_first):
    pytest.importorskip("bitsandbytes")
    ours = qlora_model(copy.deepcopy(llama64), r=4, alpha=8, targets=ATTENTION)
    _randomize_b(ours)
    twin = _peft_on_bnb(copy.deepcopy(llama64), ours, ATTENTION, eval_first=eval_first)
    with pytest.warns(UserWarning, match="rounding"):
        merged_twin = twin.merge_and_unload()
    merged = merge_qlora(copy.deepcopy(ours), into="quantized", requantize=True)
    assert compare_with_bnb(merged, merged_twin)["identical"]


def test_bitsandbytes_as_shipped_loses_the_gradient_after_an_eval_forward(llama64):
    """The chapter 6 finding on a whole model: with bitsandbytes' CPU repacking left on, one eval
    forward makes the twin's adapters of every layer but the last get wrong gradients."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    from lorabook.bnb_cpu import is_repacked

    ours = qlora_model(copy.deepcopy(llama64), r=4, alpha=8)
    _randomize_b(ours)
    twin = _peft_on_bnb(copy.deepcopy(llama64), ours, TARGETS, eval_first=True, cpu_repacking=True)
    repacked = [is_repacked(m) for m in twin.modules() if isinstance(m, bnb.nn.Linear4bit)]
    ids = _ids(shape=(2, 10))
    ours(input_ids=ids, labels=ids).loss.backward()
    with pytest.warns(UserWarning) if any(repacked) else contextlib.nullcontext():
        twin(input_ids=ids, labels=ids).loss.backward()
    grads = {n.replace(".default", ""): p.grad for n, p in twin.named_parameters()
             if p.requires_grad}
    first = "model.layers.0.self_attn.q_proj"
    same = torch.allclose(dict(lora_layers(ours))[first].B.grad,
                          grads[f"base_model.model.{first}.lora_B.weight"], rtol=1e-4, atol=1e-7)
    if has_avx512bf16():  # the machines on which bitsandbytes repacks
        assert all(repacked) and not same, "bitsandbytes no longer repacks: revisit bnb_cpu"
    else:
        assert not any(repacked) and same


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_model_on_cuda_puts_adapters_beside_the_codes(tiny_llama):
    model = qlora_model(tiny_llama.to("cuda"), r=4, alpha=8)
    assert all(layer.A.is_cuda and layer.B.is_cuda for _, layer in lora_layers(model))
    ids = _ids().cuda()
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.slow
def test_the_book_model_is_the_published_smollm2_135m():
    from transformers import AutoConfig

    from lorabook import models

    arch = architecture_from_config(AutoConfig.from_pretrained(models.lm_path()))
    published = ARCHITECTURES["SmolLM2-135M"]
    fields = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "tied")
    assert [getattr(arch, f) for f in fields] == [getattr(published, f) for f in fields]


def _items_from(ids: torch.Tensor, prompt: int) -> list[dict]:
    return [{"input_ids": row.tolist(), "labels": [-100] * prompt + row[prompt:].tolist()}
            for row in ids]


def _collate(items):
    ids = torch.tensor([it["input_ids"] for it in items])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([it["labels"] for it in items])}


def test_heldout_metrics_loss_is_the_models_loss(tiny_llama):
    items = _items_from(_ids(shape=(3, 12)), prompt=5)
    batch = _collate(items)
    with torch.no_grad():
        expected = tiny_llama(**batch).loss.item()
    seen = []  # positions the output layer computes: only from the first target on
    hook = tiny_llama.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    got = heldout_metrics(tiny_llama, items, _collate, batch_size=3)
    hook.remove()
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert seen == [12 - 4]  # targets start at token 5, predicted from position 4


def test_heldout_metrics_exact_means_greedy_writes_the_target(tiny_llama):
    ids = _ids(shape=(2, 6))
    with torch.no_grad():  # greedy continuation of 6 prompt tokens, 4 tokens long
        out = tiny_llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=4, do_sample=False, pad_token_id=0)
    items = _items_from(out, prompt=6)
    greedy = heldout_metrics(tiny_llama, items, _collate)
    assert greedy["exact"] == 1.0 and greedy["token_accuracy"] == 1.0
    items[1]["input_ids"][-1] = (items[1]["input_ids"][-1] + 1) % 128  # one wrong target token
    items[1]["labels"][-1] = items[1]["input_ids"][-1]
    assert heldout_metrics(tiny_llama, items, _collate)["exact"] == 0.5


def test_heldout_metrics_dequantizes_a_4bit_base_once(tiny_llama, monkeypatch):
    model = quantize_model(copy.deepcopy(tiny_llama))
    n_layers = sum(isinstance(m, LinearNF4) for m in model.modules())
    items = _items_from(_ids(shape=(5, 12)), prompt=5)
    # oracle: each item alone (W0 dequantized at every forward), weighted by its target tokens
    alone = [heldout_metrics(model, [it], _collate) for it in items]
    n_targets = [sum(x != -100 for x in it["labels"][1:]) for it in items]
    calls = []
    original = LinearNF4.dequantized_weight
    monkeypatch.setattr(LinearNF4, "dequantized_weight",
                        lambda self, dtype=None: calls.append(self) or original(self, dtype))
    got = heldout_metrics(model, items, _collate, batch_size=2)  # three batches
    assert len(calls) == n_layers  # once for all three batches
    for k in ("loss", "token_accuracy"):
        assert got[k] == pytest.approx(sum(a[k] * n for a, n in zip(alone, n_targets, strict=True))
                                       / sum(n_targets), rel=1e-5)
    assert got["exact"] == pytest.approx(sum(a["exact"] for a in alone) / len(items))
    assert all(m._dense is None for m in model.modules() if isinstance(m, LinearNF4))  # released


# ----------------------------------------------------------------------------- other 4-bit bases


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_qlora_model_quant_type_sets_the_format_of_the_base(tiny_llama, quant_type):
    from lorabook.quant import dequantize_4bit, quantize_4bit

    original = copy.deepcopy(tiny_llama)
    kwargs = {} if quant_type == "nf4" else {"quant_type": quant_type}  # nf4 is the default
    qlora_model(tiny_llama, r=4, alpha=8, **kwargs)
    layers = dict(lora_layers(tiny_llama))
    assert len(layers) == 2 * len(TARGETS)
    for name, layer in layers.items():
        assert type(layer.base_layer) is LinearNF4Recompute
        assert layer.base_layer.quant_type == quant_type
        W0 = original.get_submodule(name).weight.detach()
        expected = dequantize_4bit(*quantize_4bit(W0, quant_type, 64, double_quant=True))
        torch.testing.assert_close(layer.base_layer.dequantized_weight(torch.float32), expected,
                                   rtol=0, atol=0)
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)


def test_qlora_model_fp4_base_is_bitsandbytes_fp4(tiny_llama):
    import bitsandbytes.functional as BF

    W0 = tiny_llama.model.layers[0].mlp.up_proj.weight.detach().clone()  # (64, 32)
    qlora_model(tiny_llama, r=4, alpha=8, quant_type="fp4", double_quant=False)
    ours = tiny_llama.model.layers[0].mlp.up_proj.base_layer
    packed, state = BF.quantize_4bit(W0, blocksize=64, quant_type="fp4", compress_statistics=False)
    assert torch.equal(ours.weight_packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    # bitsandbytes' 2-D CPU dequantize mis-scales rows shorter than a block: ask for the flat tensor
    flat = BF.QuantState(absmax=state.absmax, shape=torch.Size([W0.numel()]), code=state.code,
                         blocksize=64, quant_type="fp4", dtype=state.dtype)
    theirs = BF.dequantize_4bit(packed, flat, quant_type="fp4").reshape(W0.shape)
    torch.testing.assert_close(ours.dequantized_weight(torch.float32), theirs, rtol=0, atol=1e-6)


def test_qlora_model_rejects_an_unknown_format_before_touching_the_model(tiny_llama):
    with pytest.raises(ValueError, match="quant_type must be one of"):
        qlora_model(tiny_llama, quant_type="nf8")
    assert not any(isinstance(m, LinearNF4) for m in tiny_llama.modules())
    assert not list(lora_layers(tiny_llama))
