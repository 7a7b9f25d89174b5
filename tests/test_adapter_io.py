"""Adapters in peft's format: ours load in peft, peft's load here, with the same logits."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorabook.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from lorabook.lora import (
    apply_lora,
    count_parameters,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    swap_adapter,
)

peft = pytest.importorskip("peft")

ATOL = 1e-5


def _randomize(model: nn.Module, seed: int) -> None:
    """Random A and non-zero B everywhere, and a random classifier if one is trained too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora_state_dict(model).items()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _peft_load(base: nn.Module, path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


CASES = [
    ("tiny_llama", {"target_modules": ["q_proj", "v_proj"], "r": 4, "alpha": 8}, "CAUSAL_LM"),
    ("tiny_llama", {"target_modules": "all-linear", "r": 2, "alpha": 16, "use_rslora": True},
     "CAUSAL_LM"),
    ("tiny_bert", {"target_modules": ["query", "value"], "r": 4, "alpha": 4,
                   "modules_to_save": ["classifier"]}, "SEQ_CLS"),
]


@pytest.mark.parametrize("model_name,kwargs,task_type", CASES)
def test_our_adapter_runs_in_peft(request, tmp_path, model_name, kwargs, task_type):
    base = request.getfixturevalue(model_name)
    ours = apply_lora(copy.deepcopy(base), **kwargs)
    _randomize(ours, 0)
    save_adapter(ours, tmp_path / "adapter", task_type=task_type)
    twin = _peft_load(base, tmp_path / "adapter")
    x = _inputs(base)
    with torch.no_grad():
        got, want, plain = ours(**x).logits, twin(**x).logits, base(**x).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - plain).abs().max() > 1e-3
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert (config.r, config.lora_alpha, config.use_rslora) == (
        kwargs["r"], kwargs["alpha"], kwargs.get("use_rslora", False))
    assert config.peft_type == peft.PeftType.LORA and config.task_type == task_type
    saved = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    assert set(saved) == set(peft.get_peft_model_state_dict(twin))


PEFT_CASES = [
    ("tiny_llama", {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8,
                    "task_type": "CAUSAL_LM"}),
    ("tiny_bert", {"target_modules": "all-linear", "r": 2, "lora_alpha": 8, "use_rslora": True,
                   "task_type": "SEQ_CLS"}),  # peft adds modules_to_save = classifier, score
]


def _peft_saved(base: nn.Module, config: dict, path, seed: int = 0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(twin.named_parameters(), key=lambda item: item[0]):
            if p.requires_grad:  # lora_A, lora_B and the saved classifier copy
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        twin.save_pretrained(str(path))
    return twin


@pytest.mark.parametrize("model_name,config", PEFT_CASES)
def test_peft_adapter_runs_here(request, tmp_path, model_name, config):
    base = request.getfixturevalue(model_name)
    twin = _peft_saved(base, config, tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    x = _inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, twin(**x).logits, atol=ATOL, rtol=0)
    # trainable counts agree; peft's total also counts its copy of modules_to_save
    assert count_parameters(ours)[0] == twin.get_nb_trainable_parameters()[0]


def test_load_into_existing_layers_takes_the_adapters_scaling(tiny_llama, tmp_path):
    config = {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8, "use_rslora": True}
    twin = _peft_saved(tiny_llama, config, tmp_path / "peft")
    ours = apply_lora(copy.deepcopy(tiny_llama), ["q_proj", "v_proj"], r=4, alpha=1)
    load_adapter(ours, tmp_path / "peft")
    assert all(layer.scaling == 4.0 for _, layer in lora_layers(ours))
    x = _inputs(tiny_llama)
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, twin(**x).logits, atol=ATOL, rtol=0)


def test_save_never_overwrites_unless_asked(tiny_llama, tmp_path):
    model = apply_lora(tiny_llama, ["q_proj"], r=2, alpha=2)
    _randomize(model, 0)
    save_adapter(model, tmp_path / "a")
    first = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    _randomize(model, 1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(model, tmp_path / "a")
    assert all(torch.equal(v, load_file(str(tmp_path / "a" / WEIGHTS_NAME))[k])
               for k, v in first.items())  # untouched
    save_adapter(model, tmp_path / "a", overwrite=True)
    again = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert all(torch.equal(v, again[k]) for k, v in lora_state_dict(model).items())
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_adapter(model, tmp_path / "file")


def test_config_file_contents(tiny_llama, tmp_path):
    model = apply_lora(tiny_llama, ["v_proj", "q_proj"], r=8, alpha=16, dropout=0.05)
    save_adapter(model, tmp_path, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert raw["peft_type"] == "LORA" and raw["bias"] == "none" and raw["fan_in_fan_out"] is False
    assert raw["target_modules"] == ["q_proj", "v_proj"] and raw["lora_dropout"] == 0.05
    assert raw["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = read_adapter_config(tmp_path)
    assert (config.r, config.alpha, config.dropout) == (8, 16, 0.05)


def test_strict_keys_and_shapes(tiny_llama, tmp_path):
    both = apply_lora(copy.deepcopy(tiny_llama), ["q_proj", "v_proj"], r=4, alpha=8)
    save_adapter(both, tmp_path / "qv")
    only_q = apply_lora(copy.deepcopy(tiny_llama), ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter(only_q, tmp_path / "qv")
    other_r = apply_lora(copy.deepcopy(tiny_llama), ["q_proj", "v_proj"], r=2, alpha=8)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(other_r, tmp_path / "qv")


def test_bad_adapter_folders(tiny_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(tiny_llama, tmp_path / "missing")
    model = apply_lora(copy.deepcopy(tiny_llama), ["q_proj"], r=2, alpha=2)
    save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({**raw, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias"):
        load_adapter(copy.deepcopy(tiny_llama), tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({**raw, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="LORA"):
        load_adapter(copy.deepcopy(tiny_llama), tmp_path / "a")
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_llama, tmp_path / "b")


def test_legacy_bin_weights(tiny_llama, tmp_path):
    model = apply_lora(copy.deepcopy(tiny_llama), ["q_proj"], r=2, alpha=2)
    _randomize(model, 0)
    save_adapter(model, tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(state, tmp_path / "adapter_model.bin")
    loaded = load_adapter(copy.deepcopy(tiny_llama), tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in lora_state_dict(loaded).items())


def test_merged_model_swaps_from_folders(tiny_llama, tmp_path):
    model = apply_lora(copy.deepcopy(tiny_llama), ["q_proj", "v_proj"], r=4, alpha=8)
    _randomize(model, 1)
    save_adapter(model, tmp_path / "one")
    x = _inputs(tiny_llama)
    with torch.no_grad():
        logits_one = model(**x).logits
    _randomize(model, 2)
    save_adapter(model, tmp_path / "two")
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        load_adapter(model, tmp_path / "one")
    swap_adapter(model, tmp_path / "one")
    assert all(layer.merged for _, layer in lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, logits_one, atol=ATOL, rtol=0)
