"""QLoRA from our parts: an NF4 base, LoRA on top, merging after it, memory budgets (chapter 6).

QLoRA = ``lorabook.quant`` (W0 in NF4 with double quantization) + ``lorabook.lora`` (A, B in fp32).
This module adds what chapter 6 needs on top of the two:

- ``LinearNF4Recompute``: the 4-bit layer as bitsandbytes runs it in training. Forward dequantizes
  W0, and backward dequantizes it *again* instead of keeping the dense W0 for the input gradient,
  so only the 4-bit codes stay in memory between the two passes.
- ``qlora_model``: quantize a model's linear layers and put LoRA on the targets, in place.
- ``merge_qlora``: merge the adapters into Q(W0) (what they were trained against) or into the
  original W0, optionally re-quantizing the merged weight to NF4 (what peft does on a 4-bit base).
- ``memory_budget``: bytes of weights, gradients and optimizer state of full fine-tuning, LoRA and
  QLoRA for a Llama-style ``Architecture``; ``ARCHITECTURES`` lists models a reader might use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabook.bnb_cpu import keep_canonical
from lorabook.data import skip_prompt_logits
from lorabook.lora import LoRALinear, apply_lora
from lorabook.quant import QUANT_TYPES, LinearNF4, dense_weights, quantize_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj",  # all linear layers of a block
           "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention only

# ----------------------------------------------------------------------------- the 4-bit base


class _DequantLinear(torch.autograd.Function):
    """y = x Q(W0)^T + b, saving nothing of W0 for backward: it is dequantized again there."""

    @staticmethod
    def forward(ctx, x, layer, dtype, bias):
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x, layer.dequantized_weight(dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        W = ctx.layer.dequantized_weight(ctx.dtype)  # (out, in), rebuilt from the 4-bit codes
        # under autocast the forward's matmul ran in bf16 and grad_out is bf16: W in grad_out's
        # dtype is what autograd does for a dense weight cast by autocast (autograd casts the
        # result back to x's dtype)
        return grad_out @ W.to(grad_out.dtype), None, None, None  # (..., in); W0, bias frozen


class LinearNF4Recompute(LinearNF4):
    """LinearNF4 that dequantizes W0 again in backward rather than keep it (chapter 6).

    Plain ``F.linear(x, dequantize(W0))`` makes autograd save the dense W0 for the input's
    gradient until backward: every layer's W0 in full precision, at once. bitsandbytes'
    ``MatMul4Bit`` keeps only the packed codes and dequantizes twice; so does this layer.
    """

    @classmethod
    def from_nf4(cls, layer: LinearNF4) -> LinearNF4Recompute:
        """The same layer (same buffers, no copy) with the recomputing forward (chapter 6)."""
        if not isinstance(layer, LinearNF4):
            raise TypeError(f"expected a LinearNF4, got {type(layer).__name__}")
        return cls(layer.weight_packed, layer.quant_state, layer.bias, layer.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)  # no backward coming: nothing to save anyway
        return _DequantLinear.apply(x.to(dtype), self, dtype, bias).to(x.dtype)


def saved_for_backward_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``fn()`` runs (chapter 6).

    Counted through ``torch.autograd.graph.saved_tensors_hooks``: activations, and any weight a
    layer computes in forward and hands to autograd (a dequantized W0, for instance); tensors
    that already existed (parameters) are counted too, once, as they stay alive anyway.
    """
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def recompute_in_backward(model: nn.Module) -> nn.Module:
    """Replace every LinearNF4 (LoRA bases included) by LinearNF4Recompute, in place (chapter 6)."""
    names = [n for n, m in model.named_modules()
             if type(m) is LinearNF4]  # subclasses already recompute
    for name in names:
        _swap(model, name, LinearNF4Recompute.from_nf4(model.get_submodule(name)))
    return model


def qlora_model(model: nn.Module, r: int = 8, alpha: float = 16,
                targets: Sequence[str] = TARGETS, blocksize: int = 64,
                double_quant: bool = True, skip: tuple[str, ...] = ("lm_head",),
                recompute: bool = True, quant_type: str = "nf4") -> nn.Module:
    """QLoRA in place: linear layers to NF4 (+ double quant), LoRA on ``targets`` (chapter 6).

    Every nn.Linear but ``skip`` is quantized (also those LoRA does not adapt: they are frozen
    either way); A and B stay fp32. ``recompute=True`` uses LinearNF4Recompute for the base.
    ``quant_type`` ("nf4", "fp4" or "int4") picks the 4-bit format of the frozen base, so that
    chapter 7 can put LoRA on an FP4 or Int4 base too. Seed before calling: A is initialised randomly.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    quantize_model(model, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type,
                   skip=skip)
    if recompute:
        recompute_in_backward(model)
    apply_lora(model, list(targets), r=r, alpha=alpha)
    for module in model.modules():  # LoRALinear takes its device from base.weight, which
        if isinstance(module, LoRALinear):  # a 4-bit layer lacks: put A, B beside the codes
            module.to(module.base_layer.weight_packed.device)
    return model


def memory_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes a (Q)LoRA model stores, by role, each tensor once (chapter 6).

    Roles: 4-bit codes, absmax and offsets, codebooks (of LinearNF4 layers); LoRA A and B;
    dense linear weights; embedding (and a tied lm_head); norms and other parameters; buffers.
    """
    out = dict.fromkeys(["NF4 codes", "absmax and offsets", "codebooks", "LoRA A, B",
                         "dense linear weights", "embedding / lm_head",
                         "norms, other parameters", "other buffers"], 0)
    seen = set()
    for _, module in model.named_modules():
        tensors = [(n, t, "param") for n, t in module.named_parameters(recurse=False)]
        tensors += [(n, t, "buffer") for n, t in module.named_buffers(recurse=False)]
        for name, t, kind in tensors:
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            if isinstance(module, LinearNF4) and kind == "buffer":
                role = {"weight_packed": "NF4 codes", "codebook": "codebooks",
                        "codebook2": "codebooks"}.get(name, "absmax and offsets")
            elif isinstance(module, LoRALinear):
                role = "LoRA A, B"
            elif kind == "buffer":
                role = "other buffers"
            elif isinstance(module, nn.Embedding) or module is _output_layer(model):
                role = "embedding / lm_head"
            elif isinstance(module, nn.Linear):
                role = "dense linear weights"
            else:
                role = "norms, other parameters"
            out[role] += t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


# ----------------------------------------------------------------------------- bitsandbytes


def bnb_config(compute_dtype: torch.dtype = torch.float32):
    """transformers' BitsAndBytesConfig for QLoRA's storage: NF4 + double quantization (chapter 6).

    quant_type must be given: bitsandbytes and transformers default to "fp4".
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def bnb_quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                       skip: tuple[str, ...] = ("lm_head",),
                       compute_dtype: torch.dtype | None = None,
                       cpu_repacking: bool = False) -> nn.Module:
    """Swap nn.Linear layers for bitsandbytes' Linear4bit (NF4) by hand, in place (chapter 6).

    What ``from_pretrained(..., quantization_config=bnb_config())`` does, without transformers:
    ``Params4bit`` quantizes its data when it is moved to a device. ``cpu_repacking=False``
    switches off bitsandbytes' in-place CPU inference repacking (``bnb_cpu``: bf16 compute, no
    autograd, a layout ``dequantize_4bit`` misreads), so the layers compute what they store.
    """
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and n not in skip and n.rsplit(".", 1)[-1] not in skip]
    for name in names:
        linear = model.get_submodule(name)
        device = linear.weight.device
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu").clone(),
                                         requires_grad=False, quant_type="nf4",
                                         blocksize=blocksize, compress_statistics=double_quant)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        _swap(model, name, layer.to(device))  # the move runs the quantization
    if not cpu_repacking and names:
        keep_canonical(model)
    model.is_loaded_in_4bit = True  # as transformers sets it: peft then wraps with 4-bit LoRA
    return model


def load_bnb_4bit(path, compute_dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None,
                  cpu_repacking: bool = False) -> tuple[nn.Module, str]:
    """(model, how): the causal LM at ``path`` with NF4 linear layers from bitsandbytes (chapter 6).

    First through transformers' ``quantization_config``; if that refuses (e.g. no CUDA in an
    older version), the layers are swapped by hand with ``bnb_quantize_model``; ``how`` says
    which, with the reason. ``cpu_repacking=False`` (the default) switches off bitsandbytes'
    in-place CPU inference repacking (``bnb_cpu.keep_canonical``); ``True`` leaves the library
    as it ships, for the reproduction of its defect.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb_config(compute_dtype), dtype=compute_dtype,
            device_map={"": str(device)})
        how = "transformers: from_pretrained(quantization_config=BitsAndBytesConfig(...))"
    except (ImportError, ValueError, RuntimeError, NotImplementedError, TypeError) as e:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype).to(device)
        bnb_quantize_model(model, compute_dtype=compute_dtype, cpu_repacking=True)
        how = f"by hand (transformers refused: {type(e).__name__}: {e})"
    if not cpu_repacking:
        keep_canonical(model)
        how += "; bitsandbytes' CPU repacking switched off (bnb_cpu.keep_canonical)"
    return model.eval(), how


def _plain_name(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.removesuffix(".base_layer")


def compare_with_bnb(ours: nn.Module, theirs: nn.Module) -> dict:
    """Byte-by-byte comparison of our LinearNF4 storage with bitsandbytes' Linear4bit (chapter 6).

    Layers are matched by name (LoRA and peft wrappers ignored). Returns the number of layers,
    the fraction of identical bytes of the packed codes and of the 8-bit absmax codes, the
    largest difference of the second-level absmax and offsets, and ``identical`` when all match.
    """
    import bitsandbytes as bnb

    mine = {_plain_name(n): m for n, m in ours.named_modules() if isinstance(m, LinearNF4)}
    other = {_plain_name(n): m for n, m in theirs.named_modules()
             if isinstance(m, bnb.nn.Linear4bit)}
    if set(mine) != set(other):
        raise ValueError(f"the models quantize different layers: only ours "
                         f"{sorted(set(mine) - set(other))[:3]}, only theirs "
                         f"{sorted(set(other) - set(mine))[:3]}")
    same_codes = same_absmax = n_codes = n_absmax = 0
    stats_diff = 0.0
    for name, layer in mine.items():
        w = other[name].weight
        qs = w.quant_state
        codes, theirs_codes = layer.weight_packed.reshape(-1), w.data.reshape(-1).to(
            layer.weight_packed.device)
        same_codes += int((codes == theirs_codes).sum())
        n_codes += codes.numel()
        absmax = qs.absmax.to(layer.absmax.device)
        same_absmax += int((layer.absmax == absmax).sum())
        n_absmax += absmax.numel()
        if layer.absmax2 is not None:
            absmax2 = qs.state2.absmax.to(layer.absmax2.device)
            stats_diff = max(stats_diff, (layer.absmax2 - absmax2).abs().max().item(),
                             abs(float(layer.absmax_offset) - float(qs.offset)))
    return {"layers": len(mine), "codes_identical": same_codes / n_codes,
            "absmax_identical": same_absmax / n_absmax, "max_stats_diff": stats_diff,
            "identical": same_codes == n_codes and same_absmax == n_absmax and stats_diff == 0}


# ----------------------------------------------------------------------------- merging


def merge_qlora(model: nn.Module, into: str = "quantized", original: nn.Module | None = None,
                requantize: bool = False) -> nn.Module:
    """Merge QLoRA adapters and drop the LoRA layers, in place; returns the model (chapter 6).

    ``into="quantized"``: W = Q(W0) + delta_W, the weight the adapters were trained against.
    ``into="original"``: W = W0 + delta_W, W0 read from ``original`` (the unquantized model with
    the same module names); layers without an adapter get their W0 back too.
    ``requantize=True`` stores every merged weight in NF4 again (same blocksize and double
    quantization), as peft does when it merges into a 4-bit layer; layers without an adapter
    keep their 4-bit W0. Otherwise merged layers become fp32 ``nn.Linear``.
    """
    if into not in ("quantized", "original"):
        raise ValueError(f"into must be 'quantized' (Q(W0)) or 'original' (W0), got {into!r}")
    if into == "original" and original is None:
        raise ValueError("into='original' needs the unquantized model as `original`")
    if into == "original" and requantize:
        raise ValueError("re-quantizing W0 + delta_W is not a QLoRA merge; requantize applies "
                         "to into='quantized'")
    modules = dict(model.named_modules())
    if not any(isinstance(m, LoRALinear) for m in modules.values()):
        raise ValueError("this model has no LoRA layers to merge")
    for name, module in list(modules.items()):
        lora = module if isinstance(module, LoRALinear) else None
        base = lora.base_layer if lora is not None else module
        if not isinstance(base, LinearNF4) or (lora is None and _inside_lora(name, modules)):
            continue
        if lora is None and requantize:
            continue  # no adapter: its 4-bit W0 is already what a re-quantized model holds
        if into == "original":
            W = original.get_submodule(name).weight.detach().float()  # (out, in)
        else:
            W = base.dequantized_weight(torch.float32)  # (out, in) = Q(W0)
        if lora is not None:
            W = W + lora.delta_weight().to(W.device)
        new = _frozen_linear(W, base.bias)
        if requantize:  # Q(Q(W0) + delta_W), the same format as before
            new = LinearNF4.from_linear(new, base.blocksize, base.absmax2 is not None,
                                        base.quant_type, base.compute_dtype)
        _swap(model, name, new)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every LinearNF4 by an fp32 nn.Linear holding Q(W), in place (chapter 6).

    The model computes the same function (the 4-bit layer dequantizes to this very weight in
    forward) without dequantizing at every call: generation runs at dense speed. LoRA layers
    over a LinearNF4 keep their adapters, now over a dense base.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LinearNF4)]
    if not names:
        raise ValueError("this model has no LinearNF4 layer to dequantize")
    for name in names:
        layer = model.get_submodule(name)
        W = layer.dequantized_weight(torch.float32)  # (out, in)
        _swap(model, name, _frozen_linear(W, layer.bias))
    return model


def _frozen_linear(W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An fp32 nn.Linear holding W (out, in) and the bias, frozen."""
    layer = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device)
    with torch.no_grad():
        layer.weight.copy_(W)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def _inside_lora(name: str, modules: dict) -> bool:
    parent = name.rpartition(".")[0]
    return isinstance(modules.get(parent), LoRALinear)


@torch.no_grad()
def heldout_metrics(model: nn.Module, items: Sequence[dict], collate_fn,
                    batch_size: int = 8, per_example: bool = False) -> dict:
    """Teacher-forced scores on tokenised held-out items, one forward pass per batch (chapter 6).

    ``loss``: cross-entropy per target token. ``token_accuracy``: share of target tokens that are
    the model's top prediction given the true prefix. ``exact``: share of examples whose every
    target token (the end of turn included) is, so that greedy decoding writes the target token
    for token: a strict exact match that needs no generation. A 4-bit base is dequantized once
    for all the batches (``quant.dense_weights``). ``per_example=True`` adds
    ``exact_per_example``: 1 or 0 for each item, in order (for paired statistics, chapter 4).
    """
    if not items:
        raise ValueError("heldout_metrics needs at least one item")
    per_item: list[int] = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll = hits = tokens = exact = 0.0
    with dense_weights(model):
        for i in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate_fn(list(items[i:i + batch_size])).items()}
            # No output layer on positions that predict no target (data.skip_prompt_logits).
            batch = skip_prompt_logits(model, batch)  # labels (B, T-first), positions first..T-1
            kept = {"logits_to_keep": batch["logits_to_keep"]} if "logits_to_keep" in batch else {}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           **kept).logits[:, :-1]  # (B, T-1-first, V)
            labels = batch["labels"][:, 1:]  # (B, T-1-first): position t predicts token t+1
            mask = labels != -100
            loss = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp_min(0),
                                   reduction="none")  # (B, T-1-first)
            right = logits.argmax(dim=-1) == labels  # (B, T-1-first)
            nll += loss[mask].sum().item()
            hits += (right & mask).sum().item()
            tokens += mask.sum().item()
            row_exact = (right | ~mask).all(dim=1)  # (B,)
            exact += row_exact.sum().item()
            per_item += row_exact.int().tolist()
    model.train(was_training)
    out = {"loss": nll / tokens, "token_accuracy": hits / tokens, "exact": exact / len(items)}
    if per_example:
        out["exact_per_example"] = per_item
    return out


# ----------------------------------------------------------------------------- memory budgets


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-style decoder, as its config.json gives it (chapter 6)."""

    name: str
    hidden: int  # hidden_size: d_model
    intermediate: int  # intermediate_size: width of the SwiGLU MLP
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads (< heads: grouped-query attention)
    vocab: int  # vocab_size
    tied: bool = False  # tie_word_embeddings: lm_head shares the embedding matrix
    source: str = ""  # where the numbers come from

    @property
    def head_dim(self) -> int:
        """Width of one attention head: hidden / heads."""
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of one block, by its name in transformers."""
        d, kv, ff = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
                "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}


_HUB = "https://huggingface.co/{}/blob/main/config.json"
ARCHITECTURES = {  # numbers from each model's published config.json on the Hugging Face hub
    a.name: a for a in [
        Architecture("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True,
                     _HUB.format("HuggingFaceTB/SmolLM2-135M-Instruct")),
        Architecture("SmolLM2-360M", 960, 2560, 32, 15, 5, 49152, True,
                     _HUB.format("HuggingFaceTB/SmolLM2-360M-Instruct")),
        Architecture("SmolLM2-1.7B", 2048, 8192, 24, 32, 32, 49152, True,
                     _HUB.format("HuggingFaceTB/SmolLM2-1.7B-Instruct")),
        Architecture("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, False,
                     _HUB.format("meta-llama/Llama-2-7b-hf")),
        Architecture("Mistral-7B", 4096, 14336, 32, 32, 8, 32000, False,
                     _HUB.format("mistralai/Mistral-7B-v0.1")),
    ]
}


LLAMA_STYLE = ("llama", "mistral")  # decoders whose parameters the formulas below count


def architecture_from_config(config, name: str | None = None) -> Architecture:
    """An Architecture read from a transformers config (LlamaConfig, MistralConfig) (chapter 6)."""
    model_type = getattr(config, "model_type", None)
    biases = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    if model_type not in LLAMA_STYLE or biases:
        raise TypeError(f"expected a Llama-style config (model_type in {LLAMA_STYLE}, no biases), "
                        f"got model_type {model_type!r}")
    try:
        arch = Architecture(
            name or getattr(config, "name_or_path", "") or config.model_type,
            config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads,
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)), "config")
    except AttributeError as e:
        raise TypeError(f"expected a Llama-style transformers config, missing {e.name!r}") from e
    head_dim = getattr(config, "head_dim", None)
    if head_dim not in (None, arch.head_dim):
        raise ValueError(f"head_dim {head_dim} != hidden / heads = {arch.head_dim}: not covered")
    return arch


def parameter_counts(arch: Architecture) -> dict[str, int]:
    """Parameters by kind: embedding, lm_head (0 when tied), linear, norms, total (chapter 6)."""
    linear = arch.layers * sum(o * i for o, i in arch.linear_shapes().values())
    counts = {"embedding": arch.vocab * arch.hidden,
              "lm_head": 0 if arch.tied else arch.vocab * arch.hidden,
              "linear": linear,
              "norms": (2 * arch.layers + 1) * arch.hidden}  # two RMSNorms per block + final
    counts["total"] = sum(counts.values())
    return counts


def lora_parameters(arch: Architecture, r: int, targets: Sequence[str] = TARGETS) -> int:
    """Trainable LoRA parameters: r (in + out) per adapted matrix, every block (chapter 6)."""
    shapes = arch.linear_shapes()
    unknown = [t for t in targets if t not in shapes]
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {list(shapes)}, got {unknown}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    return arch.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes one weight of ``numel`` elements takes in 4 bits: codes + absmax (chapter 6).

    Codes: ceil(n / 2). Absmax: one fp32 per block, or with double quantization one uint8 per
    block plus an fp32 per 256 blocks and the fp32 offset. Shared codebooks are not counted.
    """
    blocks = math.ceil(numel / blocksize)
    stats = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return (numel + 1) // 2 + stats


OPTIMIZER_BYTES = 8  # AdamW: exp_avg and exp_avg_sq in fp32 per trainable parameter


def memory_budget(arch: Architecture, method: str, r: int = 8, targets: Sequence[str] = TARGETS,
                  weight_bytes: float = 2, adapter_bytes: int = 4, blocksize: int = 64,
                  double_quant: bool = True) -> dict:
    """Training bytes of weights, gradients and AdamW state, for one method (chapter 6).

    ``method``: "full" (every weight trains; with 16-bit weights a 4-byte fp32 master copy is
    kept, as mixed precision does: 2 + 2 + 4 + 8 = 16 bytes per parameter), "lora" (base in
    ``weight_bytes``, adapters in ``adapter_bytes``) or "qlora" (the linear layers of the blocks
    in NF4, embeddings, lm_head and norms in ``weight_bytes``). Activations, the CUDA context and
    allocator slack are not included: they depend on batch and sequence length.
    """
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")
    if weight_bytes <= 0:
        raise ValueError(f"weight_bytes must be > 0, got {weight_bytes}")
    counts = parameter_counts(arch)
    n = counts["total"]
    if method == "full":
        trainable, adapters = n, 0
        weights = n * weight_bytes
        grads = n * weight_bytes
        master = n * 4 if weight_bytes < 4 else 0
    else:
        adapters = trainable = lora_parameters(arch, r, targets)
        if method == "lora":
            base = n * weight_bytes
        else:
            per_matrix = [(o * i) for o, i in arch.linear_shapes().values()]
            base = (arch.layers * sum(nf4_bytes(m, blocksize, double_quant) for m in per_matrix)
                    + (n - counts["linear"]) * weight_bytes)
        weights = base + adapters * adapter_bytes
        grads = trainable * adapter_bytes
        master = 0
    out = {"model": arch.name, "method": method, "params": n + adapters, "trainable": trainable,
           "weights": round(weights), "gradients": round(grads), "master_weights": master,
           "optimizer": trainable * OPTIMIZER_BYTES}
    out["total"] = out["weights"] + out["gradients"] + out["master_weights"] + out["optimizer"]
    out["bytes_per_param"] = out["total"] / n
    return out
