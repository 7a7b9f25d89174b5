"""Serving LoRA adapters: merged (one task per batch) or unmerged, several tasks in ONE batch (chapter 3).

A merged model, W = W0 + delta_W, costs exactly what the base costs, but it answers with one
adapter: every row of a batch goes through the same W. That is the limitation the LoRA paper states
(section 4.1): inputs for different tasks cannot share a forward pass once an adapter is merged.

Unmerged, they can. Each target layer keeps W0 once and the factors of every adapter; row b of the
batch picks adapter k(b):

    h_b = W0 x_b + scaling_k B_k A_k x_b

The base matmul is shared by the whole batch; the adapter part gathers each row's (A_k, B_k) and runs
two batched matmuls (``torch.bmm``), r * (in + out) multiply-adds per token. peft does the same
(``model(..., adapter_names=[...])``) by grouping rows per adapter; S-LoRA and Punica do it with
custom GPU kernels for thousands of adapters.

Use: ``load_multi_lora(model, {"loan": path_a, "triage": path_b})`` on a plain base model, then
``with route(model, ["loan", "triage", None, ...]): model(...)`` (``None``: the base alone).
``generate_routed`` generates a mixed batch, ``unload_multi_lora`` restores the base, and
``merge_and_unload`` turns a LoRA model into a plain merged model (the "no extra latency" model).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorabook.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from lorabook.lora import (
    _CONFIG_ATTR,
    PEFT_PREFIX,
    LoRALinear,
    WrapsLinear,
    _is_linear_like,
    lora_layers,
)

_ROUTER_ATTR = "_lorabook_adapter_router"  # where load_multi_lora keeps the router on the model
BASE = None  # the adapter "name" of a row served by the base model alone


class AdapterRouter:
    """The adapter names and the current per-row adapter ids, shared by every layer (chapter 3)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)  # slot k + 1 holds adapter names[k]; slot 0 is the base (zeros)
        self.ids: torch.Tensor | None = None  # (batch,) slot per row, set by route()

    def slots(self, adapters: Sequence[str | None]) -> list[int]:
        """Slot indices of a list of adapter names (None = base)."""
        out = []
        for a in adapters:
            if a is BASE:
                out.append(0)
            elif a in self.names:
                out.append(self.names.index(a) + 1)
            else:
                raise ValueError(f"unknown adapter {a!r}; loaded: {self.names} (or None for the base)")
        return out


class MultiLoRALinear(WrapsLinear):
    """A frozen linear layer plus several LoRA adapters; each row of a batch uses its own (chapter 3).

    Buffers: ``A`` (N + 1, r_max, in), ``B`` (N + 1, out, r_max), ``scaling`` (N + 1,). Slot 0 is
    all zeros (the base model); an adapter of rank r < r_max is zero-padded, which adds nothing to
    B A. An adapter that does not target this layer keeps a zero slot here.
    """

    def __init__(self, base: nn.Module, router: AdapterRouter, r_max: int):
        super().__init__()
        if not _is_linear_like(base):
            raise TypeError(f"MultiLoRALinear wraps a linear layer, got {type(base).__name__}")
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.router = router
        n = len(router.names) + 1
        weight = getattr(base, "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) else None
        self.register_buffer("A", torch.zeros(n, r_max, self.in_features, device=device))
        self.register_buffer("B", torch.zeros(n, self.out_features, r_max, device=device))
        self.register_buffer("scaling", torch.zeros(n, device=device))

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Put one adapter's A (r x in), B (out x r) and scaling into ``slot``."""
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(f"expected A ({r}, {self.in_features}) and B ({self.out_features}, {r}), "
                             f"got {tuple(A.shape)} and {tuple(B.shape)}")
        if r > self.A.shape[1]:
            raise ValueError(f"rank {r} exceeds this layer's r_max={self.A.shape[1]}")
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.A[slot, :r] = A.to(self.A)
            self.B[slot, :, :r] = B.to(self.B)
            self.scaling[slot] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (Bt, T, out): W0 x, shared by every row
        ids = self.router.ids
        if ids is None:
            raise RuntimeError("no adapter chosen for the rows of this batch: call the model inside "
                               "`with serving.route(model, adapters):`, one name (or None) per row")
        if x.dim() != 3 or x.shape[0] != ids.shape[0]:
            raise ValueError(f"route() was given {ids.shape[0]} adapter names but this layer got "
                             f"input of shape {tuple(x.shape)}; expected ({ids.shape[0]}, T, "
                             f"{self.in_features})")
        A, B = self.A[ids], self.B[ids]  # (Bt, r, in), (Bt, out, r): each row's own adapter
        xa = torch.bmm(x.to(A.dtype), A.transpose(1, 2))  # (Bt, T, r)
        delta = torch.bmm(xa, B.transpose(1, 2)) * self.scaling[ids].view(-1, 1, 1)  # (Bt, T, out)
        return (result + delta).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={self.router.names}, "
                f"r_max={self.A.shape[1]}")


def _read(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{module name: (A, B)} and the scaling of a peft-format adapter folder."""
    path = Path(path)
    config = read_adapter_config(path)
    if config.modules_to_save:
        raise ValueError(f"{path / CONFIG_NAME} trains whole modules ({config.modules_to_save}); "
                         "per-row serving handles LoRA factors only")
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    state = load_file(str(path / WEIGHTS_NAME))
    factors: dict[str, list] = {}
    for key, t in state.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"unexpected key {key!r} in {path / WEIGHTS_NAME}; expected "
                             f"{PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight")
        name, which = key[len(PEFT_PREFIX):].rsplit(".", 2)[:2]
        factors.setdefault(name, [None, None])[which == "lora_B"] = t
    incomplete = sorted(n for n, (a, b) in factors.items() if a is None or b is None)
    if incomplete:
        raise ValueError(f"{path / WEIGHTS_NAME} lacks lora_A or lora_B for {incomplete[:3]}")
    r = config.r
    scaling = config.alpha / (r ** 0.5 if config.use_rslora else r)
    return {n: (a, b) for n, (a, b) in factors.items()}, scaling


def load_multi_lora(model: nn.Module, adapters: Mapping[str, str | os.PathLike]) -> nn.Module:
    """Wrap every layer any adapter targets in a MultiLoRALinear holding all of them (chapter 3).

    ``adapters`` maps a name to a peft-format folder (``lora.save_adapter`` or peft's
    ``save_pretrained``). The model must be the plain base the adapters were trained on; it is
    changed in place (and frozen: this is for inference).
    """
    if not adapters:
        raise ValueError("adapters must name at least one adapter folder")
    if any(isinstance(m, (LoRALinear, MultiLoRALinear)) for m in model.modules()):
        raise ValueError("serve from the plain base model: this one already has LoRA layers "
                         "(unload_multi_lora, or load a fresh base)")
    if any(not isinstance(n, str) or not n for n in adapters):
        raise ValueError(f"adapter names must be non-empty strings, got {list(adapters)}")
    read = {name: _read(path) for name, path in adapters.items()}
    modules = dict(model.named_modules())
    targets = sorted({n for factors, _ in read.values() for n in factors})
    for n in targets:
        if n not in modules or not _is_linear_like(modules[n]):
            raise ValueError(f"an adapter targets {n!r}, which is not a linear layer of this model")
    r_max = max(a.shape[0] for factors, _ in read.values() for a, _ in factors.values())
    router = AdapterRouter(list(adapters))
    model.requires_grad_(False)
    for n in targets:
        layer = MultiLoRALinear(modules[n], router, r_max)
        for k, (factors, scaling) in enumerate(read.values(), start=1):
            if n in factors:
                layer.set_slot(k, *factors[n], scaling)
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    setattr(model, _ROUTER_ATTR, router)
    return model


def _router(model: nn.Module) -> AdapterRouter:
    router = getattr(model, _ROUTER_ATTR, None)
    if router is None:
        raise ValueError("this model serves no adapters; call load_multi_lora first")
    return router


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters load_multi_lora put into the model (chapter 3)."""
    return list(_router(model).names)


@contextmanager
def route(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row b of every batch uses adapter ``adapters[b]`` (None: base) (chapter 3)."""
    router = _router(model)
    if isinstance(adapters, str) or not len(adapters):
        raise ValueError("adapters must be a list with one adapter name (or None) per row")
    device = next(model.parameters()).device
    previous = router.ids
    router.ids = torch.tensor(router.slots(adapters), dtype=torch.long, device=device)  # (Bt,)
    try:
        yield model
    finally:
        router.ids = previous


def unload_multi_lora(model: nn.Module) -> nn.Module:
    """Put the plain base layers back and drop the adapters (chapter 3)."""
    _router(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiLoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base_layer)
    delattr(model, _ROUTER_ATTR)
    return model


def generate_routed(model: nn.Module, tokenizer, examples: Sequence, adapters: Sequence[str | None],
                    max_new_tokens: int = 40, batch_size: int = 8) -> list[str]:
    """Greedy replies to a mixed batch, row i through adapter ``adapters[i]`` (chapter 3)."""
    from lorabook.evaluate import generate

    if len(adapters) != len(examples):
        raise ValueError(f"got {len(examples)} examples but {len(adapters)} adapter names")
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        with route(model, list(adapters[i:i + batch_size])):
            out += generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens,
                            batch_size=len(chunk), progress=False)
    return out


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every unmerged LoRA layer and put plain layers back: the deployable model (chapter 3).

    The result has no LoRA code left: W = W0 + delta_W is an ordinary weight, so a forward pass
    costs exactly what the base model's does. In place; returns ``model``.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("this model has no LoRA layers; call apply_lora or load_adapter first")
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model
