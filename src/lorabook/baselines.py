"""Adapter layers and prefix tuning: the two older alternatives to LoRA, for comparison (chapter 1).

Bottleneck adapters (Houlsby et al. 2019; Lin et al. 2020) add small layers *in sequence* with the
frozen model: every token goes through them, so they add work, and latency, at inference time.
Adapter-H puts one adapter after the attention output projection and one after the MLP of every
block; Adapter-L only the one after the MLP. Each adapter is ``x + up(act(down(x)))`` with ``up``
initialised to zero, so the adapted model starts exactly at the base model.

Prefix tuning (Li & Liang 2021) learns key/value vectors for ``n_prefix`` virtual tokens in every
layer. The model attends to them as if they were earlier tokens of the sequence, so they take
positions from the context window that the reader's prompt can no longer use.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
PLACEMENTS = {"houlsby": ("attention", "mlp"), "lin": ("mlp",)}  # where adapters go in a block
PREFIX_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoder-only, RoPE, DynamicCache

# ----------------------------------------------------------------------------- adapters


class BottleneckAdapter(nn.Module):
    """x + up(act(down(x))): a residual bottleneck of width ``bottleneck`` (chapter 1).

    ``layer_norm=True`` normalises the input of the bottleneck first, as Lin et al. do:
    x + up(act(down(LN(x)))), 2*d more parameters.
    """

    def __init__(self, d_model: int, bottleneck: int, nonlinearity: str = "relu",
                 layer_norm: bool = False):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be an integer >= 1, got {d_model!r}")
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck must be an integer >= 1, got {bottleneck!r}")
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(f"nonlinearity must be one of {list(ACTIVATIONS)}, got {nonlinearity!r}")
        self.norm = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.down = nn.Linear(d_model, bottleneck)  # d -> b, default (Kaiming-uniform) init
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(bottleneck, d_model)  # b -> d, zero: the adapter starts as identity
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return x + self.up(self.act(self.down(self.norm(x))))  # (B, T, b) in the middle


class AdaptedLinear(nn.Module):
    """A frozen projection followed by a bottleneck adapter, in sequence (chapter 1)."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:  # code that reads `o_proj.weight` still finds W0
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def adapter_parameter_count(d_model: int, bottleneck: int, layer_norm: bool = False) -> int:
    """Parameters of one adapter: down (d*b + b) + up (b*d + d) = 2*d*b + b + d (chapter 1)."""
    return 2 * d_model * bottleneck + bottleneck + d_model + (2 * d_model if layer_norm else 0)


def _adapter_sites(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, kind) for each projection an adapter can follow, in layer order."""
    sites = []
    for m in model.modules():
        attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        if hasattr(attn, "o_proj") and hasattr(mlp, "down_proj"):  # Llama-style decoder layer
            sites += [(attn, "o_proj", "attention"), (mlp, "down_proj", "mlp")]
            continue
        attn_out, out = getattr(getattr(m, "attention", None), "output", None), getattr(m, "output", None)
        if hasattr(m, "intermediate") and hasattr(attn_out, "dense") and hasattr(out, "dense"):
            sites += [(attn_out, "dense", "attention"), (out, "dense", "mlp")]  # BERT layer
    return sites


def add_adapters(model: nn.Module, bottleneck: int = 16, placement: str = "houlsby",
                 nonlinearity: str = "relu", layer_norm: bool = False,
                 trainable: tuple[str, ...] = ()) -> nn.Module:
    """Freeze ``model`` and insert bottleneck adapters in sequence, in place (chapter 1).

    ``placement="houlsby"``: after the attention output projection and after the MLP of every block
    (Llama: ``self_attn.o_proj``, ``mlp.down_proj``; BERT: ``attention.output.dense``,
    ``output.dense``); ``"lin"``: after the MLP only (Lin et al. also normalise the adapter's
    input: ``layer_norm=True``). Parameter names containing any string in ``trainable``
    (e.g. ``("classifier",)``) stay trainable too. Returns ``model``.
    """
    if not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"bottleneck must be an integer >= 1, got {bottleneck!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if nonlinearity not in ACTIVATIONS:
        raise ValueError(f"nonlinearity must be one of {list(ACTIVATIONS)}, got {nonlinearity!r}")
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError("model already has adapters; call remove_adapters(model) first")
    sites = [s for s in _adapter_sites(model) if s[2] in PLACEMENTS[placement]]
    if not sites:
        raise ValueError(
            f"unsupported model {type(model).__name__}: expected Llama-style decoder layers "
            "(self_attn.o_proj, mlp.down_proj) or BERT layers (attention.output.dense, output.dense)")
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in trainable))
    for parent, attr, _ in sites:
        base = getattr(parent, attr)
        d_model = getattr(base, "out_features", None)
        if not isinstance(d_model, int):
            raise TypeError(f"{type(base).__name__} at {attr!r} has no out_features; expected a Linear")
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32  # packed 4-bit -> fp32
        adapter = BottleneckAdapter(d_model, bottleneck, nonlinearity, layer_norm).to(w.device, dtype)
        setattr(parent, attr, AdaptedLinear(base, adapter))
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the original projections back, in place; base weights keep their requires_grad (chapter 1)."""
    found = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AdaptedLinear):
                setattr(parent, name, child.base)
                found = True
    if not found:
        raise ValueError("model has no adapters to remove")
    return model


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every bottleneck adapter in ``model`` (chapter 1)."""
    return [p for m in model.modules() if isinstance(m, BottleneckAdapter) for p in m.parameters()]


# ----------------------------------------------------------------------------- prefix tuning


def _max_positions(source) -> int:
    if isinstance(source, PrefixTuning):
        source = source.model
    if isinstance(source, nn.Module):
        source = getattr(source, "config", None)
    if isinstance(source, int) and not isinstance(source, bool):
        return source
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(source, key, None), int):
            return getattr(source, key)
    raise TypeError("expected a model, a config with max_position_embeddings, or an int; "
                    f"got {type(source).__name__}")


def context_budget(source, n_prefix: int, prompt_lengths: list[int] | None = None) -> dict:
    """Context positions a prefix of ``n_prefix`` takes, and what remains for the prompt (chapter 1).

    ``source`` is a model, its config, or the maximum number of positions. With ``prompt_lengths``
    (tokens per prompt), also counts how many prompts still fit with and without the prefix.
    """
    max_positions = _max_positions(source)
    if not isinstance(n_prefix, int) or n_prefix < 0:
        raise ValueError(f"n_prefix must be an integer >= 0, got {n_prefix!r}")
    if n_prefix > max_positions:
        raise ValueError(f"n_prefix={n_prefix} exceeds the model's {max_positions} positions")
    out = {"max_positions": max_positions, "prefix_positions": n_prefix,
           "prompt_positions": max_positions - n_prefix, "fraction_taken": n_prefix / max_positions}
    if prompt_lengths is not None:
        out["prompts"] = len(prompt_lengths)
        out["prompts_fit_without_prefix"] = sum(n <= max_positions for n in prompt_lengths)
        out["prompts_fit_with_prefix"] = sum(n <= max_positions - n_prefix for n in prompt_lengths)
    return out


def positions_taken(model: nn.Module) -> int:
    """Context positions a fine-tuning method takes from the prompt: n_prefix, else 0 (chapter 1)."""
    if isinstance(model, PrefixTuning):
        return model.n_prefix
    if isinstance(model, nn.Module):
        return 0  # adapters and LoRA change weights or add layers, never positions
    raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")


def _cache_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


class PrefixTuning(nn.Module):
    """A frozen causal LM with learned key/value prefixes in every layer (chapter 1).

    The prefix is a tensor of shape (L, 2, H_kv, n_prefix, head_dim): keys and values, as the KV
    cache stores them (keys after the rotary embedding of positions 0..n_prefix-1). It is passed to
    the model as a filled ``DynamicCache``, the attention mask gets ``n_prefix`` ones on the left, and
    the input's positions start at ``n_prefix``. With ``reparameterize=True`` it is computed as in the
    paper, ``MLP(P')`` from a smaller matrix P' (n_prefix x hidden_size), for stabler training.
    Without ``init_token_ids`` the prefix starts as the keys/values of ``n_prefix`` random vocabulary
    tokens (the paper found real-word activations a better start than random vectors).
    """

    def __init__(self, model: nn.Module, n_prefix: int, reparameterize: bool = False,
                 mlp_hidden: int = 512, init_token_ids: torch.Tensor | None = None):
        super().__init__()
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) not in PREFIX_MODEL_TYPES or \
                not type(model).__name__.endswith("ForCausalLM"):
            raise TypeError(f"PrefixTuning needs a Llama-style causal LM ({PREFIX_MODEL_TYPES}); "
                            f"got {type(model).__name__}")
        self.max_positions = _max_positions(cfg)
        if not isinstance(n_prefix, int) or not 0 <= n_prefix < self.max_positions:
            raise ValueError(f"n_prefix must be an integer in [0, {self.max_positions}) "
                             f"(max_position_embeddings), got {n_prefix!r}")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.n_prefix = n_prefix
        self.n_layers = cfg.num_hidden_layers
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.reparameterize = reparameterize
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        device = next(model.parameters()).device
        shape = (self.n_layers, 2, self.n_kv_heads, n_prefix, self.head_dim)  # (L, 2, H, P, hd)
        if reparameterize:
            if init_token_ids is not None:
                raise ValueError("init_token_ids sets the prefix directly; not with reparameterize=True")
            self.prefix_embedding = nn.Parameter(0.02 * torch.randn(n_prefix, cfg.hidden_size,
                                                                    device=device))  # (P, d)
            out = self.n_layers * 2 * self.n_kv_heads * self.head_dim
            self.mlp = nn.Sequential(nn.Linear(cfg.hidden_size, mlp_hidden), nn.Tanh(),
                                     nn.Linear(mlp_hidden, out)).to(device)
        else:
            self.prefix = nn.Parameter(torch.zeros(shape, device=device))
            if n_prefix > 0:
                if init_token_ids is None:
                    init_token_ids = torch.randint(0, cfg.vocab_size, (n_prefix,))
                self.init_from_tokens(init_token_ids)

    @torch.no_grad()
    def init_from_tokens(self, token_ids: torch.Tensor) -> None:
        """Set the prefix to the base model's keys/values for ``n_prefix`` real tokens (chapter 1)."""
        if self.reparameterize:
            raise ValueError("init_from_tokens sets the prefix directly; not with reparameterize=True")
        token_ids = torch.as_tensor(token_ids).reshape(-1)
        if token_ids.numel() != self.n_prefix:
            raise ValueError(f"expected {self.n_prefix} token ids, got {token_ids.numel()}")
        ids = token_ids.to(self.prefix.device)[None]  # (1, P)
        out = self.model(input_ids=ids, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        for layer in range(self.n_layers):
            k, v = _cache_kv(cache, layer)  # (1, H, P, hd) each
            self.prefix[layer, 0].copy_(k[0])
            self.prefix[layer, 1].copy_(v[0])

    def prefix_kv(self) -> torch.Tensor:
        """The prefix keys/values, (L, 2, H_kv, n_prefix, head_dim) (chapter 1)."""
        if not self.reparameterize:
            return self.prefix
        flat = self.mlp(self.prefix_embedding)  # (P, L*2*H*hd)
        kv = flat.view(self.n_prefix, self.n_layers, 2, self.n_kv_heads, self.head_dim)
        return kv.permute(1, 2, 3, 0, 4)  # (L, 2, H, P, hd)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        """Logits (B, T, vocab) for the input tokens, and the loss when ``labels`` are given."""
        from transformers import DynamicCache

        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        P = self.n_prefix
        if P + T > self.max_positions:
            raise ValueError(f"{T} input tokens + {P} prefix positions exceed the model's "
                             f"{self.max_positions} positions; at most {self.max_positions - P} fit")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        dtype = self.model.get_input_embeddings().weight.dtype
        kv = self.prefix_kv().to(dtype)  # (L, 2, H, P, hd)
        cache = DynamicCache(ddp_cache_data=[
            (kv[i, 0].expand(B, -1, -1, -1), kv[i, 1].expand(B, -1, -1, -1))  # (B, H, P, hd)
            for i in range(self.n_layers)], config=self.model.config)
        prefix_mask = attention_mask.new_ones(B, P)
        full_mask = torch.cat([prefix_mask, attention_mask], dim=1)  # (B, P + T)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + P  # (B, T)
        return self.model(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                          labels=labels, use_cache=True, **{self._cache_arg: cache}, **kwargs)
