"""lorabook.serving: several adapters in one batch, against one merged model per row and against peft."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lorabook import serving
from lorabook.lora import (
    LoRALinear,
    apply_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

peft = pytest.importorskip("peft")

ATOL = 1e-5
ROUTES = ["a", "b", None, "b", "a"]  # one adapter (or the base) per row


def _trained_like(base: nn.Module, seed: int, **lora_kwargs) -> nn.Module:
    """A LoRA copy of ``base`` with random A and non-zero B, as if trained."""
    model = apply_lora(copy.deepcopy(base), **lora_kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora_state_dict(model).items()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture
def adapters(tiny_llama, tmp_path):
    """Two adapters of different rank, targets and scaling, saved in peft's format."""
    a = _trained_like(tiny_llama, 1, target_modules=["q_proj", "v_proj"], r=4, alpha=8)
    b = _trained_like(tiny_llama, 2, target_modules="all-linear", r=2, alpha=16, use_rslora=True)
    paths = {"a": save_adapter(a, tmp_path / "a"), "b": save_adapter(b, tmp_path / "b")}
    return {"a": a, "b": b, None: tiny_llama}, paths


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 128, (len(ROUTES), 9), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in two rows, as in batched generation
    mask[4, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_mixed_batch_matches_each_rows_own_model(tiny_llama, adapters):
    models, paths = adapters
    batch = _batch()
    served = serving.load_multi_lora(copy.deepcopy(tiny_llama), paths).eval()
    with torch.no_grad(), serving.route(served, ROUTES):
        mixed = served(**batch).logits  # (B, T, V)
    for row, name in enumerate(ROUTES):
        with torch.no_grad():
            alone = models[name](**batch).logits[row]  # the same padded batch through one model
        torch.testing.assert_close(mixed[row], alone, atol=ATOL, rtol=0)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # the adapters do differ


def test_mixed_batch_matches_merged_models(tiny_llama, adapters):
    models, paths = adapters
    batch = _batch()
    served = serving.load_multi_lora(copy.deepcopy(tiny_llama), paths).eval()
    with torch.no_grad(), serving.route(served, ROUTES):
        mixed = served(**batch).logits
    for row, name in enumerate(ROUTES):
        model = tiny_llama if name is None else merge_lora(copy.deepcopy(models[name]))
        with torch.no_grad():
            torch.testing.assert_close(mixed[row], model(**batch).logits[row], atol=ATOL, rtol=0)


def test_mixed_batch_matches_peft_adapter_names(tiny_llama, adapters):
    _, paths = adapters
    batch = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(paths["a"]),
                                              adapter_name="a")
        twin.load_adapter(str(paths["b"]), adapter_name="b")
    twin.eval()
    names = [n if n is not None else "__base__" for n in ROUTES]
    served = serving.load_multi_lora(copy.deepcopy(tiny_llama), paths).eval()
    with torch.no_grad():
        expected = twin(**batch, adapter_names=names).logits
        with serving.route(served, ROUTES):
            got = served(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_routed_generation_gives_each_rows_own_tokens(tiny_llama, adapters):
    models, paths = adapters
    batch = _batch()
    served = serving.load_multi_lora(copy.deepcopy(tiny_llama), paths).eval()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), serving.route(served, ROUTES):
        mixed = served.generate(**batch, **kw)  # (B, T + 6)
    for row, name in enumerate(ROUTES):
        with torch.no_grad():
            alone = models[name].generate(**batch, **kw)[row]
        assert torch.equal(mixed[row], alone), f"row {row} ({name})"


def test_route_validates_names_and_batch_size(tiny_llama, adapters):
    _, paths = adapters
    served = serving.load_multi_lora(copy.deepcopy(tiny_llama), paths)
    assert serving.adapter_names(served) == ["a", "b"]
    ids = torch.randint(3, 128, (2, 5))
    with pytest.raises(RuntimeError, match="route"):
        served(input_ids=ids)
    with pytest.raises(ValueError, match="unknown adapter"):
        with serving.route(served, ["a", "c"]):
            pass
    with pytest.raises(ValueError, match="3 adapter names"):
        with serving.route(served, ["a", "b", None]):
            served(input_ids=ids)
    with pytest.raises(ValueError, match="one adapter name"):
        with serving.route(served, "a"):
            pass
    with serving.route(served, ["a", None]):
        pass
    with pytest.raises(RuntimeError, match="route"):  # the routing ends with the block
        served(input_ids=ids)


def test_load_refuses_lora_models_and_foreign_targets(tiny_llama, tiny_bert, adapters, tmp_path):
    models, paths = adapters
    with pytest.raises(ValueError, match="plain base"):
        serving.load_multi_lora(copy.deepcopy(models["a"]), paths)
    with pytest.raises(ValueError, match="not a linear layer"):
        serving.load_multi_lora(copy.deepcopy(tiny_bert), {"a": paths["a"]})
    with pytest.raises(ValueError, match="at least one"):
        serving.load_multi_lora(copy.deepcopy(tiny_llama), {})


def test_unload_restores_the_base(tiny_llama, adapters):
    _, paths = adapters
    before = dict(tiny_llama.named_modules())
    batch = _batch()
    with torch.no_grad():
        expected = tiny_llama(**batch).logits
    served = serving.load_multi_lora(copy.deepcopy(tiny_llama), paths)
    assert sum(isinstance(m, serving.MultiLoRALinear) for m in served.modules()) == 14  # all 7 x 2
    serving.unload_multi_lora(served)
    assert not any(isinstance(m, serving.MultiLoRALinear) for m in served.modules())
    assert set(dict(served.named_modules())) == set(before)
    with torch.no_grad():
        assert torch.equal(served(**batch).logits, expected)


def test_merge_and_unload_is_a_plain_model_with_w0_plus_delta(tiny_llama, adapters):
    models, _ = adapters
    lora = models["b"]
    deltas = {n: layer.delta_weight() for n, layer in lora_layers(lora)}
    batch = _batch()
    with torch.no_grad():
        expected = lora(**batch).logits
    merged = serving.merge_and_unload(copy.deepcopy(lora))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    w0 = dict(tiny_llama.named_modules())
    for n, delta in deltas.items():
        assert torch.equal(merged.get_submodule(n).weight, w0[n].weight + delta)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        serving.merge_and_unload(merged)
