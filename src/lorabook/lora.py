"""LoRA from scratch: h = W0 x + scaling * B A x, with peft's conventions (chapter 2).

Notation: W0 (out x in) frozen, A (r x in), B (out x r), scaling = alpha / r (or alpha / sqrt(r)
with rsLoRA), delta_W = scaling * B @ A. Conventions copied from peft's ``tuners/lora/layer.py``
so that parity needs only a state-dict copy: A gets ``kaiming_uniform_(a=sqrt(5))``, B starts at
zero, dropout sits on the LoRA branch only, A and B are kept in fp32 (peft's
``autocast_adapter_dtype``) and merge/unmerge compute in fp32 whatever the weight dtype.

Saving and loading in peft's format (``save_adapter``, ``load_adapter``, ``swap_adapter``) live in
``lorabook.adapter_io`` and are re-exported here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorabook.init import INIT_CHOICES, LOFTQ_DEFAULTS, loftq_factors, pissa_factors

_CONFIG_ATTR = "_lorabook_lora_config"  # where apply_lora records its settings on the model
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output head


@dataclass
class LoRAConfig:
    """The settings apply_lora used; save_adapter writes them as peft's adapter_config.json."""

    r: int = 8  # rank of B A; peft's default
    alpha: float = 8  # lora_alpha; peft's default (scaling 1 at r = 8)
    dropout: float = 0.0  # dropout on the LoRA branch only; 0 means nn.Identity, as in peft
    use_rslora: bool = False  # scaling alpha / sqrt(r) (rsLoRA) instead of alpha / r
    target_modules: str | list[str] = field(default_factory=list)  # regex str, or name suffixes
    modules_to_save: list[str] | None = None  # modules trained in full and saved with the adapter
    use_dora: bool = False  # DoRA: magnitude and direction (DoRALinear), chapter 8
    init_lora_weights: bool | str = True  # True (B = 0), "pissa" or "loftq" (lorabook.init)
    loftq_config: dict | None = None  # {"loftq_bits": 4, "loftq_iter": T} with "loftq"


def _is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or any layer with integer in_features/out_features (e.g. a quantized linear)."""
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    ins, outs = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return isinstance(ins, int) and isinstance(outs, int)


class WrapsLinear(nn.Module):
    """A module around a frozen ``base_layer`` that code reading ``.weight``/``.bias`` can treat
    as that layer (chapter 2)."""

    base_layer: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (W0, or W0 + delta_W once merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (LoRA adds none)."""
        return getattr(self.base_layer, "bias", None)


class LoRALinear(WrapsLinear):
    """A frozen linear layer plus a trainable update: base(x) + scaling * B A x (chapter 2).

    ``base`` is an ``nn.Linear``, or any module with ``in_features``/``out_features`` (such as
    ``lorabook.quant.LinearNF4``). Such a base works for training and inference; ``merge()``
    needs a floating-point ``weight`` of shape (out, in), so a quantized base raises a TypeError:
    dequantize it into an ``nn.Linear`` first, or keep the adapter unmerged.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        if not _is_linear_like(base):
            raise TypeError(
                f"LoRALinear wraps an nn.Linear (or a layer with in_features/out_features), "
                f"got {type(base).__name__}"
            )
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"r must be an int >= 1, got {r!r}")
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base.requires_grad_(False)  # W0 is frozen; peft's name for it
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = getattr(base, "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) else None
        dtype = torch.float32  # adapters stay fp32 on an fp16/bf16/quantized base, as in peft
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.float64:
            dtype = torch.float64
        self.A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # loralib / peft; B = 0 so delta_W = 0
        self.merged = False

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def delta_weight(self) -> torch.Tensor:
        """delta_W = scaling * B @ A, shape (out, in), computed in fp32 (chapter 2)."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        xa = self.dropout(x.to(self.A.dtype))  # (..., in), dropout on the LoRA branch only
        update = F.linear(F.linear(xa, self.A), self.B) * self.scaling  # (..., r) -> (..., out)
        return (result + update).to(result.dtype)

    def _base_weight(self) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        stored = [*self.base_layer._parameters.values(), *self.base_layer._buffers.values()]
        ok = (isinstance(weight, torch.Tensor) and weight.is_floating_point()
              and any(weight is t for t in stored))  # not a tensor computed on the fly
        if not ok or tuple(weight.shape) != (self.out_features, self.in_features):
            raise TypeError(
                f"cannot merge into a {type(self.base_layer).__name__} base: merging needs a "
                f"floating-point weight of shape ({self.out_features}, {self.in_features}); "
                "dequantize the base into an nn.Linear first, or keep the adapter unmerged"
            )
        return weight

    def _add_to_weight(self, sign: float) -> None:
        weight = self._base_weight()
        dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32 arithmetic, then cast
        with torch.no_grad():
            new = weight.to(dtype) + sign * self.delta_weight().to(weight.device, dtype)
            weight.copy_(new.to(weight.dtype))

    def merge(self) -> None:
        """W0 <- W0 + delta_W, so forward costs one matmul (chapter 2)."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; merging twice adds B A twice")
        self._add_to_weight(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - delta_W, restoring W0 up to floating-point rounding (chapter 2)."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged; nothing to unmerge")
        self._add_to_weight(-1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


class DoRALinear(LoRALinear):
    """DoRA: W' = m * V / ||V||_c with direction V = W0 + scaling B A (chapter 8).

    m (out,) is a trainable magnitude per output row, initialised to the row norms of W0 + scaling
    B A (peft's ``lora_magnitude_vector``); the norm ||V||_c is detached in the backward pass, as
    the DoRA paper (section 4.3) and peft do. Forward adds to base(x) the correction
    (m / ||V|| - 1) * W0 x + (m / ||V||) * scaling B A x, so W0 is never copied. A quantized base
    trains (W0 dequantized for the norm) but, as for LoRA, cannot be merged into.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__(base, r, alpha, dropout, use_rslora)
        self.magnitude = nn.Parameter(torch.empty(self.out_features, dtype=self.A.dtype,
                                                  device=self.A.device))  # (out,)
        self._merge_norm: torch.Tensor | None = None  # ||V||_c at merge time, for unmerge
        self.reset_magnitude()

    def dense_weight(self) -> torch.Tensor:
        """W0 as a dense (out, in) tensor: the base's weight, or its dequantized weight."""
        dequantize = getattr(self.base_layer, "dequantized_weight", None)
        weight = dequantize(self.A.dtype) if callable(dequantize) else self.base_layer.weight
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (self.out_features,
                                                                           self.in_features):
            raise TypeError(f"DoRA needs W0 of shape ({self.out_features}, {self.in_features}) "
                            f"from a {type(self.base_layer).__name__} base")
        return weight

    def weight_norm(self) -> torch.Tensor:
        """||W0 + scaling B A|| per output row, shape (out,), detached (chapter 8)."""
        with torch.no_grad():
            W0 = self.dense_weight().to(self.A.dtype)
            return torch.linalg.norm(W0 + self.delta_weight(), dim=1)  # (out,)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m <- ||W0 + scaling B A||_c, so that W' = W0 + scaling B A at this point (chapter 8)."""
        self.magnitude.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out) = W0 x + b
        if self.merged:
            return result
        x = x.to(self.A.dtype)
        W0 = self.dense_weight().to(x.dtype)  # (out, in)
        scale = self.magnitude / self.weight_norm()  # (out,) m / ||V||_c, norm detached
        xd = self.dropout(x)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.bias
            base = result.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)  # W0 x
        else:
            base = F.linear(xd, W0)  # W0 applied to the dropped-out input, as in peft
        lora = F.linear(F.linear(xd, self.A), self.B) * self.scaling  # (..., out)
        return (result + (scale - 1) * base + scale * lora).to(result.dtype)

    def _add_to_weight(self, sign: float) -> None:
        weight = self._base_weight()
        dtype = torch.promote_types(weight.dtype, torch.float32)
        with torch.no_grad():
            delta = self.delta_weight().to(weight.device, dtype)
            if sign > 0:  # W' = (m / ||W0 + dW||) (W0 + dW), the norm kept for unmerge
                self._merge_norm = torch.linalg.norm(weight.to(dtype) + delta, dim=1)
                factor = (self.magnitude.to(dtype) / self._merge_norm)[:, None]  # (out, 1)
                new = factor * (weight.to(dtype) + delta)
            else:  # W0 = W' / factor - dW
                factor = (self.magnitude.to(dtype) / self._merge_norm)[:, None]
                new = weight.to(dtype) / factor - delta
                self._merge_norm = None
            weight.copy_(new.to(weight.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def _name_matches(name: str, targets: str | Sequence[str]) -> bool:
    """peft's rule: a str is a regex full-matched on the name; a list matches equal or suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def _in_modules_to_save(name: str, modules_to_save: Sequence[str] | None) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save or ())


def _resolve_targets(model: nn.Module, targets: str | Sequence[str],
                     modules_to_save: Sequence[str] | None, strict: bool) -> list[str]:
    """Names of the modules apply_lora wraps; raises if a target matches nothing or a non-linear."""
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        get_out = getattr(model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        names = [n for n, m in model.named_modules()
                 if n and _is_linear_like(m) and m is not out
                 and not _in_modules_to_save(n, modules_to_save)]
        if not names:
            raise ValueError("target_modules='all-linear' found no linear layer in this model")
        return names
    if not isinstance(targets, str):
        targets = list(targets)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"target_modules must be a regex str or a non-empty list of names, "
                             f"got {targets!r}")
    names = [n for n, _ in model.named_modules()
             if n and _name_matches(n, targets) and not _in_modules_to_save(n, modules_to_save)]
    linear_suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                              if n and _is_linear_like(m)})
    entries = [targets] if isinstance(targets, str) else targets
    unmatched = [t for t in entries if not any(
        _name_matches(n, t if isinstance(targets, str) else [t]) for n in names)]
    if not names or (strict and unmatched):
        raise ValueError(f"target_modules {unmatched!r} matched no module of this model; "
                         f"its linear layers are named {linear_suffixes}")
    modules = dict(model.named_modules())
    for n in names:
        if not _is_linear_like(modules[n]):
            raise TypeError(f"target {n!r} is a {type(modules[n]).__name__}, not a linear layer; "
                            f"LoRA targets linear layers such as {linear_suffixes}")
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield (module name, LoRALinear) for every LoRA layer of the model (chapter 2)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def get_lora_config(model: nn.Module) -> LoRAConfig | None:
    """The LoRAConfig that apply_lora recorded on the model, or None (chapter 2)."""
    return getattr(model, _CONFIG_ATTR, None)


def _check_init(config: LoRAConfig) -> None:
    """init_lora_weights and loftq_config as peft accepts them, for the choices built here."""
    init = config.init_lora_weights
    if not (init is True or isinstance(init, str) and init in INIT_CHOICES):
        raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, "
                         f"got {config.init_lora_weights!r}")
    if config.init_lora_weights == "loftq":
        if not config.loftq_config:
            raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. "
                             "{'loftq_bits': 4, 'loftq_iter': 1}")
        unknown = set(config.loftq_config) - set(LOFTQ_DEFAULTS)
        if unknown:
            raise ValueError(f"loftq_config has unknown keys {sorted(unknown)}; "
                             f"expected {sorted(LOFTQ_DEFAULTS)}")
        config.loftq_config = {**LOFTQ_DEFAULTS, **config.loftq_config}
    elif config.loftq_config:
        raise ValueError("loftq_config is given but init_lora_weights is not 'loftq'")


def _check_svd_init(name: str, base: nn.Module, config: LoRAConfig) -> None:
    weight = getattr(base, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()
            and isinstance(base, nn.Linear)):
        raise TypeError(f"{name}: init_lora_weights={config.init_lora_weights!r} rewrites W0 "
                        f"(to its residual), which needs an nn.Linear with a float weight, got a "
                        f"{type(base).__name__}; initialise the float model, then quantize it")
    if config.r > min(weight.shape):
        raise ValueError(f"{name}: r = {config.r} is above min(out, in) = {min(weight.shape)} "
                         f"for its weight of shape {tuple(weight.shape)}")


@torch.no_grad()
def _initialise(layer: LoRALinear, config: LoRAConfig) -> None:
    """PiSSA or LoftQ: set A, B and replace W0 by the residual / its quantization (chapter 8)."""
    if config.init_lora_weights == "pissa":
        A, B, W = pissa_factors(layer.base_layer.weight, layer.r, layer.scaling)
    elif config.init_lora_weights == "loftq":
        A, B, W, _ = loftq_factors(layer.base_layer.weight, layer.r, layer.scaling,
                                   num_iter=config.loftq_config["loftq_iter"],
                                   num_bits=config.loftq_config["loftq_bits"])
    else:
        return
    layer.A.copy_(A)
    layer.B.copy_(B)
    layer.base_layer.weight.copy_(W)
    if isinstance(layer, DoRALinear):  # peft's order: the init, then DoRA's magnitude
        layer.reset_magnitude()


def _apply(model: nn.Module, config: LoRAConfig, strict: bool) -> nn.Module:
    if any(True for _ in lora_layers(model)):
        raise ValueError("this model already has LoRA layers; use load_adapter or swap_adapter "
                         "to change their weights")
    saved = [n for n, _ in model.named_modules() if n and config.modules_to_save
             and _name_matches(n, config.modules_to_save)]
    if config.modules_to_save and not saved:
        raise ValueError(f"modules_to_save {config.modules_to_save!r} matched no module")
    names = _resolve_targets(model, config.target_modules, config.modules_to_save, strict)
    _check_init(config)
    # build every layer first so a bad r/alpha/dropout raises before the model is touched
    layer_cls = DoRALinear if config.use_dora else LoRALinear
    if config.init_lora_weights is not True:
        for n in names:  # PiSSA and LoftQ need the float W0 and r <= min(out, in): check first
            _check_svd_init(n, model.get_submodule(n), config)
    wrapped = {n: layer_cls(model.get_submodule(n), config.r, config.alpha, config.dropout,
                            config.use_rslora) for n in names}
    for layer in wrapped.values():
        _initialise(layer, config)
    model.requires_grad_(False)  # freeze everything, then open A, B and modules_to_save
    for name, layer in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        layer.A.requires_grad_(True)
        layer.B.requires_grad_(True)
        if isinstance(layer, DoRALinear):
            layer.magnitude.requires_grad_(True)
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = sorted(names)  # peft records the expanded list too
    setattr(model, _CONFIG_ATTR, config)
    return model


def apply_lora(model: nn.Module, target_modules: str | Sequence[str], r: int, alpha: float,
               dropout: float = 0.0, use_rslora: bool = False,
               modules_to_save: Sequence[str] | None = None, use_dora: bool = False,
               init_lora_weights: bool | str = True,
               loftq_config: dict | None = None) -> nn.Module:
    """Wrap the target linear layers in LoRALinear, freeze the rest, return the model (chapter 2).

    Names are matched as peft matches them: a str is a regex full-matched on each module name
    ("all-linear" means every linear layer but the output head); a list matches names equal to
    an entry or ending with "." + entry, and here every entry must match something.
    ``modules_to_save`` (e.g. ["classifier"]) stay fully trainable and are saved with the adapter.
    Chapter 8's variants keep peft's names: ``use_dora=True`` (DoRALinear),
    ``init_lora_weights="pissa"`` or ``"loftq"`` with ``loftq_config={"loftq_bits": 4,
    "loftq_iter": T}`` (W0 replaced by the residual, resp. its NF4 round trip: see lorabook.init).
    """
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                        target_modules=targets,
                        modules_to_save=list(modules_to_save) if modules_to_save else None,
                        use_dora=bool(use_dora), init_lora_weights=init_lora_weights,
                        loftq_config=dict(loftq_config) if loftq_config else None)
    return _apply(model, config, strict=True)


def _layers_or_raise(model: nn.Module) -> list[LoRALinear]:
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("this model has no LoRA layers; call apply_lora first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer: W = W0 + delta_W in place (chapter 2)."""
    layers = _layers_or_raise(model)
    if any(layer.merged for layer in layers):
        raise RuntimeError("some LoRA layers are already merged; call unmerge_lora first")
    for layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora: W0 = W - delta_W in every LoRA layer (chapter 2)."""
    layers = _layers_or_raise(model)
    if not all(layer.merged for layer in layers):
        raise RuntimeError("some LoRA layers are not merged; nothing to unmerge there")
    for layer in layers:
        layer.unmerge()
    return model


PEFT_PREFIX = "base_model.model."  # peft's key prefix in adapter_model.safetensors


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Live parameters under peft's key names: LoRA factors, then modules_to_save."""
    params = {}
    for name, layer in lora_layers(model):
        params[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.A
        params[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.B
        if isinstance(layer, DoRALinear):
            params[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.magnitude  # peft's key
    config = get_lora_config(model)
    if config is not None and config.modules_to_save:
        for name, module in model.named_modules():
            if name and _name_matches(name, config.modules_to_save):
                for pname, p in module.named_parameters():
                    params[f"{PEFT_PREFIX}{name}.{pname}"] = p
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (detached, shared storage) under peft's key names (chapter 2)."""
    return {key: p.detach() for key, p in _adapter_parameters(model).items()}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once (chapter 2)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


_IO_NAMES = ("save_adapter", "load_adapter", "swap_adapter")


def __getattr__(name: str) -> object:  # re-export adapter_io lazily (it imports this module)
    if name in _IO_NAMES:
        from lorabook import adapter_io

        return getattr(adapter_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
