"""LoRA+ parameter groups (lorabook.loraplus) against peft 0.21's create_loraplus_optimizer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lorabook.lora import _adapter_parameters, apply_lora
from lorabook.loraplus import create_loraplus_optimizer, loraplus_groups

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa: E402


def _canonical(peft_name: str) -> str:
    """peft's parameter name as its saved key: no adapter name, no modules_to_save wrapper."""
    name = peft_name.replace(".default", "").replace(".modules_to_save", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def _groups_by_key(optimizer, key_of) -> list[tuple[frozenset, float, float]]:
    return [(frozenset(key_of(p) for p in g["params"]), g["lr"], g["weight_decay"])
            for g in optimizer.param_groups]


@pytest.mark.parametrize("use_dora", [False, True])
def test_groups_match_peft(tiny_bert, use_dora):
    kwargs = {"r": 4, "use_dora": use_dora, "target_modules": ["query", "value"],
              "modules_to_save": ["classifier"]}
    ours = apply_lora(copy.deepcopy(tiny_bert), kwargs["target_modules"], r=4, alpha=8,
                      use_dora=use_dora, modules_to_save=["classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(tiny_bert), peft.LoraConfig(
            lora_alpha=8, task_type="SEQ_CLS", **kwargs))
    settings = {"lr": 2e-4, "loraplus_lr_ratio": 16, "loraplus_weight_decay": 0.01}
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, **settings)
    theirs = peft_loraplus(twin, torch.optim.AdamW, **settings)
    ours_key = {id(p): k for k, p in _adapter_parameters(ours).items()}
    peft_key = {id(p): _canonical(n) for n, p in twin.named_parameters()}
    got = _groups_by_key(mine, lambda p: ours_key[id(p)])
    want = _groups_by_key(theirs, lambda p: peft_key[id(p)])
    assert got == want
    a_group, _, b_group, b_no_decay = got  # lr 2e-4 for A, 16 x for B, m and the biases
    assert a_group[1] == 2e-4 and b_group[1] == b_no_decay[1] == pytest.approx(3.2e-3)
    assert any(k.endswith("lora_B.weight") for k in b_group[0])
    assert any(k.endswith("classifier.bias") for k in b_no_decay[0])
    assert any(k.endswith("lora_magnitude_vector") for k in b_group[0]) == use_dora


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="no LoRA layers"):
        loraplus_groups(tiny_llama, lr=1e-3, loraplus_lr_ratio=4)
    model = apply_lora(copy.deepcopy(tiny_llama), ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        loraplus_groups(model, lr=1e-3, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="lr must be"):
        loraplus_groups(model, lr=-1.0, loraplus_lr_ratio=4)
