"""LoRA+: a larger learning rate for B than for A (Hayou et al. 2024), chapter 8.

Nothing changes in the model: only the optimizer's parameter groups. With lr for A and
lr * ratio for B, ``create_loraplus_optimizer`` builds the same four groups as
``peft.optimizers.create_loraplus_optimizer``, by the same rules:

- group A: every other trainable matrix (the A factors, a classifier's weight), lr;
- embedding: LoRA on an embedding layer (not built here, so always empty), lr_embedding;
- group B: B factors and every trainable vector (DoRA's magnitude m, a bias), lr * ratio, with
  weight decay ``loraplus_weight_decay``; those inside a LayerNorm or named "bias" get none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorabook.lora import LoRALinear


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that get no weight decay: in a LayerNorm, or named "bias" (transformers' rule)."""
    names = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                names.add(full)
    return names


def loraplus_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float,
                    loraplus_weight_decay: float = 0.0, loraplus_lr_embedding: float = 1e-6
                    ) -> list[dict]:
    """The optimizer's parameter groups of LoRA+: A at lr, B (and vectors) at lr * ratio (chapter 8)."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be positive (the paper uses 2 to 16), "
                         f"got {loraplus_lr_ratio!r}")
    b_params = {id(layer.B) for layer in model.modules() if isinstance(layer, LoRALinear)}
    if not b_params:
        raise ValueError("this model has no LoRA layers; call apply_lora first")
    no_decay = _no_decay_names(model)
    group_a, group_b, group_b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in b_params or p.ndim == 1:  # B, DoRA's m, biases: the "B side"
            (group_b_no_decay if name in no_decay else group_b).append(p)
        else:
            group_a.append(p)
    return [
        {"params": group_a, "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": [], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": group_b, "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": group_b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: Callable[..., torch.optim.Optimizer],
                              *, lr: float, loraplus_lr_ratio: float,
                              **kwargs) -> torch.optim.Optimizer:
    """peft's create_loraplus_optimizer, for a model from apply_lora (chapter 8)."""
    groups = loraplus_groups(model, lr, loraplus_lr_ratio,
                             kwargs.pop("loraplus_weight_decay", 0.0),
                             kwargs.pop("loraplus_lr_embedding", 1e-6))
    return optimizer_cls(groups, lr=lr, **kwargs)
