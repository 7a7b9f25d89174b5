"""Adapters on disk in peft's format: save, load, swap (chapter 2).

An adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module name>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r),
with no adapter name, exactly as ``peft.PeftModel.save_pretrained`` writes them; so
``peft.PeftModel.from_pretrained(base, path)`` reads ours and ``load_adapter`` reads peft's.

Swap recipe (the paper's "switch task by subtracting BA and adding B'A'"): ``unmerge_lora``,
load the other adapter's weights, ``merge_lora``; ``swap_adapter`` does the three steps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorabook.lora import (
    _CONFIG_ATTR,
    DoRALinear,
    LoRAConfig,
    _adapter_parameters,
    _apply,
    get_lora_config,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # older peft versions

# peft options this from-scratch LoRA does not implement: a config setting any of them is refused
_UNSUPPORTED = {"lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                "layers_pattern": None, "exclude_modules": None, "target_parameters": None,
                "layer_replication": None, "trainable_token_indices": None}


def _config_of(model: nn.Module) -> LoRAConfig:
    """The model's LoRAConfig, checked against its layers (or rebuilt from them)."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("this model has no LoRA layers; call apply_lora first")
    settings = {(layer.r, layer.alpha, layer.use_rslora, isinstance(layer, DoRALinear))
                for _, layer in layers}
    if len(settings) != 1:
        raise ValueError(f"peft's format needs one r, alpha, use_rslora and use_dora for every "
                         f"layer, found {sorted(settings)}")
    r, alpha, use_rslora, use_dora = settings.pop()
    config = get_lora_config(model)
    if config is None:  # LoRALinear layers placed by hand: list them by full name
        config = LoRAConfig(r=r, alpha=alpha, use_rslora=use_rslora, use_dora=use_dora,
                            target_modules=sorted(name for name, _ in layers))
    if (config.r, config.alpha, config.use_rslora, config.use_dora) != (r, alpha, use_rslora,
                                                                        use_dora):
        raise ValueError("the model's LoRA layers no longer agree with its recorded LoRAConfig")
    return config


def save_adapter(model: nn.Module, path: str | os.PathLike, overwrite: bool = False,
                 base_model_name_or_path: str | None = None,
                 task_type: str | None = "CAUSAL_LM") -> Path:
    """Write the adapter in peft's format; never overwrites one unless asked (chapter 2)."""
    config = _config_of(model)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; an adapter is saved as a folder")
    existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (path / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{path} already holds an adapter ({', '.join(existing)}); "
                              "pass overwrite=True to replace it")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    targets = config.target_modules
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "r": config.r, "lora_alpha": alpha,
        "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "modules_to_save": config.modules_to_save, "use_dora": config.use_dora,
        "init_lora_weights": config.init_lora_weights, "loftq_config": config.loftq_config or {},
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path or None,
        "revision": None, **_UNSUPPORTED,
    }
    tensors = {k: v.detach().to("cpu").clone().contiguous()
               for k, v in lora_state_dict(model).items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """Read peft's adapter_config.json as a LoRAConfig; refuses options not built (chapter 2)."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a peft adapter folder")
    raw = json.loads(file.read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{file} has peft_type={raw.get('peft_type')!r}; expected 'LORA'")
    for key, default in _UNSUPPORTED.items():
        value = raw.get(key, default)
        if value is not None and value != default and key != "layers_pattern":
            raise ValueError(f"{file} sets {key}={value!r}, which lorabook's LoRA does not "
                             f"implement (expected {default!r})")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(("pissa", "loftq")):
        raise ValueError(f"{file} is a {init!r} adapter: it was trained on a base whose W0 was "
                         "replaced by a residual, so it does not apply to the original W0; "
                         "convert it to a plain LoRA (B' A' = B A - B0 A0, peft's "
                         "path_initial_model_for_weight_conversion) or rebuild that base")
    targets = raw.get("target_modules")
    if targets is None:
        raise ValueError(f"{file} has no target_modules")
    return LoRAConfig(r=int(raw["r"]), alpha=raw.get("lora_alpha", 8),
                      dropout=float(raw.get("lora_dropout", 0.0)),
                      use_rslora=bool(raw.get("use_rslora", False)),
                      target_modules=targets if isinstance(targets, str) else sorted(targets),
                      modules_to_save=raw.get("modules_to_save"),
                      use_dora=bool(raw.get("use_dora", False)))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_NAME).is_file():
        return load_file(str(path / WEIGHTS_NAME))
    if (path / LEGACY_WEIGHTS_NAME).is_file():
        return torch.load(path / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {path}")


def _copy_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors keyed as peft keys them into the model; keys and shapes must match exactly."""
    params = _adapter_parameters(model)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter keys do not match the model's LoRA layers: missing "
                         f"{missing[:4]}{' ...' if len(missing) > 4 else ''} ({len(missing)}), "
                         f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} "
                         f"({len(unexpected)})")
    for key, p in params.items():
        if tuple(state[key].shape) != tuple(p.shape):
            raise ValueError(f"{key}: the adapter holds shape {tuple(state[key].shape)}, the model "
                             f"expects {tuple(p.shape)} (a different r?)")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a peft-format adapter, applying LoRA from its config if needed (chapter 2)."""
    path = Path(path)
    config = read_adapter_config(path)
    state = _read_weights(path)
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        _apply(model, config, strict=False)  # peft semantics: only "nothing matched" is an error
    elif any(isinstance(layer, DoRALinear) != config.use_dora for layer in layers):
        raise ValueError(f"{path} holds a {'DoRA' if config.use_dora else 'LoRA'} adapter but "
                         f"the model's layers are {'LoRA' if config.use_dora else 'DoRA'}")
    elif any(layer.merged for layer in layers):
        raise RuntimeError("the model's LoRA layers are merged; unmerge_lora first "
                           "(or use swap_adapter)")
    _copy_weights(model, state)  # checks names and shapes before copying anything
    if layers:  # the adapter brings its own scaling
        for layer in layers:
            layer.alpha, layer.use_rslora = config.alpha, config.use_rslora
        recorded = get_lora_config(model) or config
        recorded.alpha, recorded.use_rslora = config.alpha, config.use_rslora
        setattr(model, _CONFIG_ATTR, recorded)
    return model


def swap_adapter(model: nn.Module,
                 adapter: str | os.PathLike | Mapping[str, torch.Tensor]) -> nn.Module:
    """Swap in another adapter (folder or peft-keyed dict); re-merges if merged (chapter 2)."""
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("this model has no LoRA layers; call apply_lora or load_adapter first")
    merged = [layer.merged for layer in layers]
    if any(merged) and not all(merged):
        raise RuntimeError("some LoRA layers are merged and some are not; merge or unmerge all")
    if all(merged):
        unmerge_lora(model)
    if isinstance(adapter, Mapping):
        _copy_weights(model, adapter)
    else:
        load_adapter(model, adapter)
    if all(merged):
        merge_lora(model)
    return model
