"""Rank and target-module sweeps of LoRA against full fine-tuning, results kept on disk (chapter 4).

One run is a ``RunSpec``: which model (the encoder on review sentiment, or the causal LM on the
loan task), full fine-tuning or LoRA at rank r on a set of matrices, alpha/r or alpha/sqrt(r)
scaling, and the storage of the frozen base (float, or 4-bit NF4/FP4/Int4 as in QLoRA). For the
runs of record (``lorabook.record``) a spec can also be bottleneck adapters or prefix tuning of a
``size``, no training at all (zero-shot), and a validation run (``split="val"``).
``run_one`` trains it through ``lorabook.train.train`` and scores it on held-out data;
``run_sweep`` runs a list of them, appending each record to a results file (``lorabook.results``)
so that an interrupted sweep resumes where it stopped. From a shell::

    LORABOOK_MODE=cpu python -m lorabook.sweep --model encoder --ranks 1,2,4,8,16,64 \\
        --seeds 0,1 --out benchmarks/results/sweep_encoder_cpu.jsonl
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorabook import data, evaluate, experiments, models, qlora
from lorabook.config import RunSettings, get_dtype, get_settings, seed_everything
from lorabook.lora import apply_lora, lora_state_dict
from lorabook.quant import quantize_model
from lorabook.results import append_record, load_results, open_results, read_results, summarize
from lorabook.train import TrainConfig, autocast, train

__all__ = ["TARGET_SETS", "RunSpec", "make_grid", "run_one", "run_sweep", "load_results",
           "summarize", "encoder_data", "lm_data", "load_base", "prepare_model", "keeping_factors",
           "stored_results", "lora_parameter_count"]

MODELS = ("encoder", "lm")
METHODS = ("lora", "full", "adapter", "prefix", "none")
# adapter: bottleneck adapters of width `size` (Houlsby placement); prefix: prefix tuning with
# `size` virtual tokens (the LM only); none: no training (the LM's zero-shot score)
SIZED = ("adapter", "prefix")
SCALINGS = ("lora", "rslora")  # alpha / r (Hu et al.), alpha / sqrt(r) (rsLoRA)
BASES = ("float", "nf4", "fp4", "int4")  # storage of the frozen W0 under the adapters
# Chapter 8's methods after LoRA, as variants of a LoRA spec (method "lora"): DoRA's magnitude and
# direction, PiSSA's and LoftQ's initialisations (LoftQ on a 4-bit base only), LoRA+'s learning
# rate for B, VeRA's shared frozen pair with trained vectors (r is VeRA's rank, alpha unused)
VARIANTS = ("dora", "pissa", "loftq", "loraplus", "vera")
VARIANT_NAMES = {"dora": "DoRA", "pissa": "PiSSA", "loftq": "LoftQ", "loraplus": "LoRA+",
                 "vera": "VeRA"}
LORAPLUS_RATIO = 16.0  # lr of B / lr of A: the LoRA+ paper's 2^4, its choice for LLaMA-size models
LOFTQ_ITER = 5  # LoftQ's alternations T (the LoftQ paper's default for its 4-bit experiments)
VERA_R = 256  # VeRA's rank: peft's default (the shared A, B are random: a large r costs little)

_BERT_ATTENTION = ("query", "key", "value", "attention.output.dense")
TARGET_SETS = {  # names matched as apply_lora matches them: equal, or a "."-suffix of the name
    "encoder": {  # BertForSequenceClassification (all-MiniLM-L6-v2); the classifier is never one
        "q": ("query",),
        "qv": ("query", "value"),
        "attn": _BERT_ATTENTION,
        "all": (*_BERT_ATTENTION, "intermediate.dense", "output.dense"),  # every linear of a block
    },
    "lm": {  # LlamaForCausalLM (SmolLM2-135M-Instruct); lm_head is never one
        "q": ("q_proj",),
        "qv": ("q_proj", "v_proj"),
        "attn": qlora.ATTENTION,
        "all": qlora.TARGETS,
    },
}
HEAD = {"encoder": "classifier", "lm": "lm_head"}  # trained in every encoder run; never quantized

# Alpha is fixed across r, as in the LoRA paper (alpha = the first r tried, then not tuned), so
# alpha/r and alpha/sqrt(r) really differ: 16, the book's standard adapter (r = 8, chapter 3).
# Learning rates, calibrated in the cpu setting of the stored sweeps (commit 1d26bf0: 80 encoder
# steps of 16 sentences, 500 test sentences; 40 LM steps of 8), seed 0, alpha = 16, scaling alpha/r:
# - encoder, LoRA on W_q, W_v, held-out accuracy: r = 8 at lr 3e-4 0.500 (stuck), 1e-3 0.648,
#   3e-3 0.746, 1e-2 0.532 (diverged); r = 1 at 1e-3 0.702, 3e-3 0.748; r = 64 at 1e-3 0.656,
#   3e-3 0.756. Full fine-tuning at 2e-4 (chapter 2's choice): 0.800.
# - LM: chapter 3's lr 2e-3 for r = 8 on all linear layers (teacher-forced exact match 0.225,
#   loss 0.099 on 40 test examples; full fine-tuning at 5e-5, chapter 1: 0.325, loss 0.111),
#   checked at the grid's extremes: W_q at r = 1 (scaling 16) 0.000, token accuracy 0.883,
#   loss 0.459 (stable, weak); all linear at r = 64 (scaling 0.25) 0.325, loss 0.099.
ALPHA = {"encoder": 16.0, "lm": 16.0}
LORA_LR = {"encoder": 3e-3, "lm": experiments.LORA_LR}  # AdamW lr of A, B (and the head)
FULL_LR = {"encoder": 2e-4, "lm": experiments.FULL_FT_LR}  # AdamW lr of full fine-tuning
ADAPTER_LR = {"encoder": 1e-3, "lm": 1e-3}  # AdamW lr of bottleneck adapters (and the head)
PREFIX_LR = {"lm": 1e-2}  # AdamW lr of prefix tuning's keys and values (Li & Liang: 5e-5..8e-3)
# VeRA trains only scaling vectors, which need a larger step: its paper uses 1e-2 to 4e-2 on
# RoBERTa (classifier head at 4e-3 to 1e-2); 1e-2 here, chosen again on validation for the record
VERA_LR = {"encoder": 1e-2, "lm": 1e-2}
CURVE_ITEMS = 64  # held-out items scored at each point of a learning curve
ENCODER_BATCH = 16  # sentences per step (chapter 2's encoder runs use the same)
ENCODER_MAX_LENGTH = 64  # tokens per sentence
EVAL_BATCH = 64  # sentences (encoder) per evaluation batch


def _positive(value, name: str, kind: type = float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (kind is int and not isinstance(value, int)):
        raise ValueError(f"{name} must be a positive {kind.__name__} or None, got {value!r}")


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep; None for alpha/lr/steps = this module's defaults (chapter 4)."""

    model: str  # "encoder" (review sentiment) or "lm" (loan task)
    method: str  # "lora" or "full" (every weight trains)
    r: int | None = None  # LoRA rank; None for full fine-tuning
    targets: str | None = None  # key of TARGET_SETS[model]; None for full fine-tuning
    scaling: str | None = "lora"  # "lora": alpha / r, "rslora": alpha / sqrt(r); None when full
    base: str = "float"  # W0 storage: "float" (the settings' dtype), "nf4" (+ double quant), "fp4", "int4"
    seed: int = 0  # seeds A's init, the encoder's new head and the data order
    alpha: float | None = None  # None: ALPHA[model], the same for every r
    lr: float | None = None  # None: LORA_LR, FULL_LR, ADAPTER_LR or PREFIX_LR of the model
    steps: int | None = None  # None: settings.encoder_steps (encoder) or settings.train_steps (lm)
    size: int | None = None  # adapter bottleneck width or number of prefix tokens; else None
    split: str | None = None  # None: train, score on test; "val": fit on part of the training
    # templates and score on the rest (choosing the learning rate, never looking at the test)
    dense_base: bool | None = None  # 4-bit bases only: True holds the de-quantized Q(W0) as a
    # dense frozen weight (the same function, bit for bit in fp32, at LoRA's cost per step: the
    # QLoRA quality runs of record); None trains on the 4-bit codes (memory and time per step)
    variant: str | None = None  # chapter 8: one of VARIANTS on top of a LoRA spec; None = LoRA

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")
        if self.split not in (None, "val"):
            raise ValueError(f"split must be None (test) or 'val', got {self.split!r}")
        if self.method != "lora":
            what = {"full": "full fine-tuning", "adapter": "an adapter run",
                    "prefix": "prefix tuning", "none": "a run without training"}[self.method]
            for name in ("r", "targets", "alpha"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{what} has no {name}: leave it None "
                                     f"(got {name}={getattr(self, name)!r})")
            if self.scaling not in (None, "lora"):
                raise ValueError(f"{what} has no LoRA scaling, got {self.scaling!r}")
            if self.base != "float":
                raise ValueError(f"{what} needs base='float', got {self.base!r} (only LoRA "
                                 "runs here on a 4-bit W0)")
            object.__setattr__(self, "scaling", None)  # irrelevant: one canonical spec
            if self.method in SIZED:
                if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
                    raise ValueError(f"{what} needs an int size >= 1 (bottleneck width or prefix "
                                     f"tokens), got {self.size!r}")
            elif self.size is not None:
                raise ValueError(f"{what} has no size: leave it None (got {self.size!r})")
            if self.method in ("prefix", "none") and self.model != "lm":
                raise ValueError(f"{what} is defined for the causal LM only, got model {self.model!r}")
        else:
            if self.size is not None:
                raise ValueError(f"LoRA has no size (its rank is r), got size={self.size!r}")
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
                raise ValueError(f"LoRA needs an int rank r >= 1, got {self.r!r}")
            if self.targets not in TARGET_SETS[self.model]:
                raise ValueError(f"targets must be one of {sorted(TARGET_SETS[self.model])} for "
                                 f"model {self.model!r}, got {self.targets!r}")
            if self.scaling not in SCALINGS:
                raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if self.dense_base not in (None, True):
            raise ValueError(f"dense_base must be None (the 4-bit path) or True, got {self.dense_base!r}")
        if self.dense_base and self.base == "float":
            raise ValueError("dense_base=True holds a de-quantized 4-bit W0: it needs base "
                             f"'nf4', 'fp4' or 'int4', got base={self.base!r}")
        if self.variant is not None:
            _check_variant(self)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        for name in ("alpha", "lr"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), name)
                object.__setattr__(self, name, float(getattr(self, name)))
        if self.steps is not None:
            _positive(self.steps, "steps", int)

    def resolved(self, settings: RunSettings | None = None) -> RunSpec:
        """The same run with alpha, lr and steps filled in from the defaults (chapter 4)."""
        settings = settings or get_settings()
        lora = self.method == "lora"
        if self.method == "none":
            return self
        default_lr = {"lora": LORA_LR, "full": FULL_LR, "adapter": ADAPTER_LR,
                      "prefix": PREFIX_LR}[self.method][self.model]
        if self.variant == "vera":
            default_lr = VERA_LR[self.model]
        return replace(
            self,
            alpha=self.alpha if self.alpha is not None or not lora else ALPHA[self.model],
            lr=self.lr if self.lr is not None else default_lr,
            steps=self.steps if self.steps is not None else (
                settings.encoder_steps if self.model == "encoder" else settings.train_steps))

    @property
    def scaling_factor(self) -> float | None:
        """alpha / r or alpha / sqrt(r) once alpha is known; None for full fine-tuning."""
        if self.method != "lora" or self.alpha is None or self.variant == "vera":
            return None
        return self.alpha / (math.sqrt(self.r) if self.scaling == "rslora" else self.r)

    def key(self) -> str:
        """A stable id of the run: every field that is set, e.g. "lm|lora|r=8|targets=qv|..." (chapter 4)."""
        parts = [self.model, self.method]
        for name in ("r", "targets", "scaling", "base", "seed", "alpha", "lr", "steps", "size",
                     "split", "dense_base", "variant"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}")
        return "|".join(parts)

    def label(self) -> str:
        """A short human label, e.g. "LoRA r=8 on qv (nf4)" or "full fine-tuning" (chapter 4)."""
        if self.method != "lora":
            return {"full": "full fine-tuning", "none": "no training (zero-shot)",
                    "adapter": f"adapters (bottleneck {self.size})",
                    "prefix": f"prefix tuning ({self.size} tokens)"}[self.method]
        extra = [s for s in (self.scaling if self.scaling != "lora" else "",
                             self.base if self.base != "float" else "",
                             "dense Q(W0)" if self.dense_base else "") if s]
        name = VARIANT_NAMES.get(self.variant, "LoRA")
        if self.variant == "vera":
            extra = [e for e in extra if e != self.scaling]  # VeRA has no alpha / r scaling
        return f"{name} r={self.r} on {self.targets}" + (f" ({', '.join(extra)})" if extra else "")


def _check_variant(spec: RunSpec) -> None:
    """A variant is a LoRA spec; LoftQ needs the NF4 base it initialises for (chapter 8)."""
    if spec.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} or None, got {spec.variant!r}")
    if spec.method != "lora":
        raise ValueError(f"variant {spec.variant!r} modifies a LoRA run: method must be 'lora', "
                         f"got {spec.method!r}")
    if spec.dense_base:
        raise ValueError(f"variant {spec.variant!r} trains on the 4-bit codes: dense_base must "
                         "be None (the QLoRA grid's dense_base runs are plain LoRA)")
    if spec.variant == "loftq" and spec.base != "nf4":
        raise ValueError(f"LoftQ initialises for an NF4 base: base must be 'nf4', got {spec.base!r}")
    if spec.variant in ("vera", "loraplus") and spec.base != "float":
        raise ValueError(f"variant {spec.variant!r} is run here on a float base, got {spec.base!r}")


def _unique(values: Sequence, name: str) -> list:
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}")
    return values


def make_grid(model: str, ranks: Sequence[int] = (1, 2, 4, 8, 16, 64),
              targets: Sequence[str] = ("q", "qv", "attn", "all"),
              scalings: Sequence[str] = ("lora",), bases: Sequence[str] = ("float",),
              seeds: Sequence[int] = (0,), full: bool = True) -> list[RunSpec]:
    """Every combination as a RunSpec, seed by seed; full=True adds one full fine-tuning per seed (chapter 4).

    The order puts each seed's runs together, the reference first, so a sweep stopped halfway
    has complete seeds to show.
    """
    ranks, targets = _unique(ranks, "ranks"), _unique(targets, "targets")
    scalings, bases, seeds = (_unique(scalings, "scalings"), _unique(bases, "bases"),
                              _unique(seeds, "seeds"))
    specs = []
    for seed in seeds:
        if full:
            specs.append(RunSpec(model, "full", seed=seed))
        specs += [RunSpec(model, "lora", r, t, s, b, seed)
                  for b in bases for s in scalings for t in targets for r in ranks]
    return specs


# ---------------------------------------------------------------- data, models, one run


def encoder_data(tokenizer, settings: RunSettings, validation: bool = False) -> dict:
    """Review sentences: tokenised train items, padded test batches, the collate function (chapter 4).

    The same sentences for every seed (``data.load_reviews``' seed 0), as in chapter 2: a seed
    changes the initialisation and the order of the batches, not the data.
    """
    n_train, n_test = settings.encoder_train, settings.encoder_eval
    if validation:  # the fit/val pools are three quarters and a quarter of the training movies
        n_train, n_test = n_train // 2, n_test // 2
    reviews = data.load_reviews(n_train, n_test, validation=validation)
    return {"items": data.tokenize_encoder(tokenizer, *reviews["train"], max_length=ENCODER_MAX_LENGTH),
            "test_batches": data.encoder_batches(tokenizer, *reviews["test"], batch_size=EVAL_BATCH,
                                                 max_length=ENCODER_MAX_LENGTH),
            "collate": partial(data.collate_encoder, pad_id=tokenizer.pad_token_id or 0)}


def lm_data(tokenizer, settings: RunSettings, validation: bool = False) -> dict:
    """The loan task: tokenised train items, tokenised held-out items, the collate function (chapter 4).

    ``validation=True``: fit and val templates of the training split instead of train and test.
    """
    d = experiments.task_data(tokenizer, "loan_intent", settings, validation=validation)
    return {"items": d["items"], "collate": experiments.collate_for(tokenizer), "test": d["test"],
            "test_items": data.tokenize_causal(tokenizer, d["test"], experiments.MAX_LENGTH)}


def load_base(spec: RunSpec, dtype: torch.dtype | None = None):
    """(model, tokenizer) of the spec's base model in ``dtype`` (default: the settings'), eval mode (chapter 4)."""
    dtype = dtype or get_dtype()
    if spec.model == "encoder":
        return models.load_encoder(dtype=dtype, seed=spec.seed)  # the head is seeded
    return models.load_lm(dtype=dtype)


def _quantize_base(model: torch.nn.Module, spec: RunSpec) -> None:
    """W0 in the spec's 4-bit base (NF4 with double quantization, FP4 or Int4), in place; the
    classifier head stays float (chapters 6-8)."""
    quantize_model(model, blocksize=64, double_quant=spec.base == "nf4", quant_type=spec.base,
                   skip=(HEAD[spec.model],))


def prepare_model(model: torch.nn.Module, spec: RunSpec) -> torch.nn.Module:
    """Make the spec's parameters trainable, in place: all, or LoRA on a float/4-bit W0 (chapter 4).

    Seeds A's initialisation with ``spec.seed``. The encoder's classifier head is new: it
    trains in every run (``modules_to_save``). The head is never quantized. Returns the model
    to train: ``model`` itself, or, for prefix tuning, the ``baselines.PrefixTuning`` around it.
    """
    from lorabook import baselines

    spec = spec.resolved()
    if spec.method == "full":
        return model.requires_grad_(True)
    if spec.method == "none":
        return model.requires_grad_(False)
    if spec.method in SIZED:
        seed_everything(spec.seed)
        if spec.method == "prefix":
            return baselines.PrefixTuning(model, n_prefix=spec.size)
        head = (HEAD[spec.model],) if spec.model == "encoder" else ()
        return baselines.add_adapters(model, bottleneck=spec.size, trainable=head)
    if spec.variant is not None:
        return _prepare_variant(model, spec)
    if spec.base != "float":
        _quantize_base(model, spec)
        if spec.dense_base:  # Q(W0) once, as a frozen dense weight: same function, LoRA's cost
            qlora.dequantize_model(model)
        else:
            qlora.recompute_in_backward(model)  # keep only the 4-bit codes between forward and backward
    seed_everything(spec.seed)
    return apply_lora(model, TARGET_SETS[spec.model][spec.targets], r=spec.r, alpha=spec.alpha,
                      use_rslora=spec.scaling == "rslora",
                      modules_to_save=[HEAD[spec.model]] if spec.model == "encoder" else None)


def _prepare_variant(model: torch.nn.Module, spec: RunSpec) -> torch.nn.Module:
    """Chapter 8's variants: VeRA, or LoRA with DoRA / PiSSA / LoftQ / LoRA+ (chapter 8).

    PiSSA and LoftQ rewrite W0 (to the residual, resp. its NF4 round trip) on the float model;
    a 4-bit base is quantized afterwards, so that Q(W_res) is what the adapter trains against.
    LoRA+ changes only the optimizer (``run_one`` passes the ratio to ``train``).
    """
    from lorabook.vera import apply_vera

    head = [HEAD[spec.model]] if spec.model == "encoder" else None
    targets = TARGET_SETS[spec.model][spec.targets]
    seed_everything(spec.seed)
    if spec.variant == "vera":
        return apply_vera(model, targets, r=spec.r, projection_prng_key=spec.seed,
                          modules_to_save=head)
    init = {"pissa": "pissa", "loftq": "loftq"}.get(spec.variant, True)
    if spec.base != "float" and init is True:  # DoRA on a 4-bit base: quantize W0 first
        _quantize_base(model, spec)
    apply_lora(model, targets, r=spec.r, alpha=spec.alpha, use_rslora=spec.scaling == "rslora",
               modules_to_save=head, use_dora=spec.variant == "dora", init_lora_weights=init,
               loftq_config={"loftq_bits": 4, "loftq_iter": LOFTQ_ITER} if init == "loftq" else None)
    if spec.base != "float" and init is not True:  # QPiSSA, LoftQ: quantize the new W0
        _quantize_base(model, spec)
    if spec.base != "float":
        qlora.recompute_in_backward(model)
    return model


def lora_parameter_count(model: torch.nn.Module, kind: str, targets: str, r: int) -> int:
    """Trainable numbers of LoRA on a target set: r (in + out) per matched linear layer (chapter 4)."""
    from lorabook.lora import _is_linear_like, _name_matches

    if targets not in TARGET_SETS.get(kind, {}):
        raise ValueError(f"unknown target set {targets!r} for model kind {kind!r}")
    names = list(TARGET_SETS[kind][targets])
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if n and _is_linear_like(m) and _name_matches(n, names))


def _stored_bytes(model: torch.nn.Module, spec: RunSpec) -> int:
    """Bytes a task must store: A, B (+ the saved head) for LoRA, every weight for full FT,
    the trained parameters for adapters and prefix tuning, nothing without training."""
    if spec.method == "none":
        return 0
    if spec.variant == "vera":  # d, b (and the head); A, B are regenerated from the seed
        tensors = [p for p in model.parameters() if p.requires_grad]
    elif spec.method == "lora":
        tensors = lora_state_dict(model).values()
    elif spec.method == "full":
        tensors = {id(p): p for p in model.parameters()}.values()  # tied weights once
    else:
        tensors = [p for p in model.parameters() if p.requires_grad]
    return sum(t.numel() * t.element_size() for t in tensors)


def _bits(values: Sequence[int]) -> str:
    """Per-example 1/0 scores as one compact string, "0110..." (stored in the records)."""
    return "".join("1" if v else "0" for v in values)


def run_one(spec: RunSpec, settings: RunSettings | None = None, progress: bool = False,
            return_model: bool = False,
            before_training: Callable[[torch.nn.Module], None] | None = None,
            mixed_precision: bool = False, curve_every: int = 0, generation: bool = False):
    """Train and score one run; its record (dict), or (record, model) with return_model (chapter 4).

    Encoder: held-out accuracy on review sentences. LM: teacher-forced held-out metrics of the
    loan task (``qlora.heldout_metrics``): ``exact`` is the score, with ``token_accuracy`` and
    ``loss``; no generation, so it is fast. Each example's 1/0 score is kept in the record
    (``per_example``) for paired statistics (``lorabook.evidence``). ``before_training(model)``
    is called once the model is prepared, e.g. to keep A's random initialisation.

    ``mixed_precision``: fp32 weights, bf16 matmuls under autocast (the runs of record on a GPU).
    ``curve_every``: score the first ``CURVE_ITEMS`` held-out examples every that many steps (a
    learning curve, for showing a plateau; never used to pick anything). ``generation``: also
    generate replies greedily and score their fields (LM; not with prefix tuning).
    """
    settings = settings or get_settings()
    spec = spec.resolved(settings)
    validation = spec.split == "val"
    t_load = time.perf_counter()
    model, tokenizer = load_base(spec, torch.float32) if mixed_precision else load_base(spec)
    make_data = encoder_data if spec.model == "encoder" else lm_data
    d = make_data(tokenizer, settings, validation=True) if validation else make_data(tokenizer, settings)
    model = prepare_model(model, spec)
    if before_training is not None:
        before_training(model)
    setup_s = time.perf_counter() - t_load
    device = next(model.parameters()).device
    amp = "bfloat16" if mixed_precision else None
    batch = ENCODER_BATCH if spec.model == "encoder" else settings.batch_size

    def score(m: torch.nn.Module, few: bool = False) -> dict:
        if spec.model == "encoder":
            batches = d["test_batches"][:max(1, CURVE_ITEMS // EVAL_BATCH)] if few else d["test_batches"]
            correct = evaluate.classifier_correct(m, batches)
            return {"score": sum(correct) / len(correct), "accuracy": sum(correct) / len(correct),
                    "per_example": _bits(correct)}
        items = d["test_items"][:CURVE_ITEMS] if few else d["test_items"]
        out = qlora.heldout_metrics(m, items, d["collate"], per_example=True)
        return {"score": out["exact"], "exact": out["exact"], "loss": out["loss"],
                "token_accuracy": out["token_accuracy"],
                "per_example": _bits(out["exact_per_example"])}

    hist = None
    if spec.method != "none":
        cfg = TrainConfig(steps=spec.steps, lr=spec.lr, batch_size=batch, seed=spec.seed,
                          warmup_steps=min(5, spec.steps), progress=progress, desc=spec.label(),
                          autocast=amp, eval_every=curve_every,
                          loraplus_lr_ratio=LORAPLUS_RATIO if spec.variant == "loraplus" else None)

        def curve_point(m: torch.nn.Module) -> dict:
            return {k: v for k, v in score(m, few=True).items() if k != "per_example"}

        hist = train(model, d["items"], cfg, d["collate"], curve_point if curve_every else None)
    t_eval = time.perf_counter()
    with autocast(device, amp):
        metrics = score(model)
        if generation and spec.model == "lm" and spec.method != "prefix":
            gen = experiments.score(model, tokenizer, d["test"], batch_size=128)
            metrics.update({f"gen_{k}": v for k, v in gen.items()})
    summary = hist.summary() if hist else {"first_loss": None, "final_loss": None}
    trainable = hist.trainable_params if hist else 0
    record = {
        "key": spec.key(), **asdict(spec), "label": spec.label(), "mode": settings.mode,
        "scaling_factor": spec.scaling_factor, **metrics,
        "trainable": trainable,
        "total": hist.total_params if hist else sum(p.numel() for p in model.parameters()),
        "adapter_bytes": _stored_bytes(model, spec), "batch_size": batch,
        "dtype": "float32 weights, bfloat16 autocast" if amp else str(get_dtype()).replace("torch.", ""),
        "train_s": hist.wall_time_s if hist else 0.0,
        "step_s": hist.median_step_s if hist else None,
        "setup_s": setup_s, "eval_s": time.perf_counter() - t_eval,
        "peak_memory_bytes": hist.peak_memory_bytes if hist else None,
        "memory_increase_bytes": hist.memory_increase_bytes if hist else None,
        "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
        "train_loss": hist.loss if hist else [],
        "curve": hist.evals if hist else [],
        "provenance": experiments.provenance(),
    }
    return (record, model) if return_model else record


def keeping_factors(layers: Sequence[str], store: dict) -> Callable[..., dict]:
    """A runner for run_sweep that also keeps A, B, scaling and W0 of the named layers (chapter 4).

    ``store[key][layer]`` = {"A": (r, in), "A_init": A before training, "B": (out, r),
    "scaling": float, "W0": (out, in)}, fp32 on the CPU, for every LoRA run it trains (runs
    read back from a file have none). Layers are named as in apply_lora: names or "."-suffixes.
    """
    from lorabook.lora import _name_matches, lora_layers

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).clone()

    def chosen(model: torch.nn.Module) -> dict:
        return {n: m for n, m in lora_layers(model) if _name_matches(n, list(layers))}

    def runner(spec: RunSpec, settings: RunSettings | None = None) -> dict:
        init = {}

        def keep_init(model: torch.nn.Module) -> None:
            init.update({n: copy(m.A) for n, m in chosen(model).items()})

        record, model = run_one(spec, settings, return_model=True, before_training=keep_init)
        if spec.method == "lora":
            kept = {}
            for name, layer in chosen(model).items():
                base = layer.base_layer
                W0 = base.dequantized_weight(torch.float32) if hasattr(
                    base, "dequantized_weight") else base.weight
                kept[name] = {"A": copy(layer.A), "A_init": init[name], "B": copy(layer.B),
                              "scaling": layer.scaling, "W0": copy(W0)}
            store[spec.key()] = kept
        return record

    return runner


def run_sweep(specs: Sequence[RunSpec], path, settings: RunSettings | None = None,
              progress: bool = True, runner: Callable[..., dict] | None = None) -> list[dict]:
    """Run every spec not already in the results file at ``path``, appending each record (chapter 4).

    Specs are compared by the key of their resolved form (defaults filled in, so steps count);
    a file made with other run settings is refused. Returns one record per distinct spec, in
    the order given, read from the file for the runs done before. ``runner`` replaces run_one.
    """
    settings = settings or get_settings()
    runner = runner or run_one
    resolved = list(dict.fromkeys(s.resolved(settings) for s in specs))  # distinct, in order
    _, done = open_results(path, settings)
    by_key = {r["key"]: r for r in done}
    todo = [s for s in resolved if s.key() not in by_key]
    bar = tqdm(resolved, desc="sweep", disable=not progress)
    for spec in bar:
        if spec.key() in by_key:
            continue
        bar.set_postfix_str(f"{spec.label()}, seed {spec.seed} ({len(todo)} to run)")
        record = runner(spec, settings=settings)
        if record.get("key") != spec.key():
            raise ValueError(f"the runner returned a record with key {record.get('key')!r} for "
                             f"{spec.key()!r}")
        append_record(path, record)
        by_key[spec.key()] = record
    return [by_key[s.key()] for s in resolved]


def stored_results(model: str, mode: str = "cpu") -> Path | None:
    """The committed sweep ``benchmarks/results/sweep_{model}_{mode}.jsonl``, or None (chapter 4).

    Looked for in ``$LORABOOK_RESULTS`` (a folder) if set, else in the repository this package
    was installed from (editable install), above the current directory, and in ``$LORABOOK_DIR``
    (where colab_setup.sh clones the book).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    name = f"sweep_{model}_{mode}.jsonl"
    if os.environ.get("LORABOOK_RESULTS"):
        folders = [Path(os.environ["LORABOOK_RESULTS"])]
    else:
        roots = [Path(__file__).resolve().parents[2], Path.cwd(), *Path.cwd().parents,
                 Path(os.environ.get("LORABOOK_DIR", "/content/lorabook"))]
        folders = [root / "benchmarks" / "results" for root in roots]
    return next((f / name for f in folders if (f / name).is_file()), None)


# ---------------------------------------------------------------- command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """``python -m lorabook.sweep``: run a grid into a results file and print a summary (chapter 4)."""
    parser = argparse.ArgumentParser(
        prog="python -m lorabook.sweep",
        description="Sweep LoRA's rank r over sets of adapted matrices (plus full fine-tuning as "
                    "the reference), on the encoder (review sentiment, score = held-out accuracy) "
                    "or the causal LM (loan task, score = teacher-forced exact match). The run "
                    "setting comes from $LORABOOK_MODE (fast, cpu, gpu). Each finished run is "
                    "appended to --out at once; re-running the same command skips runs already "
                    "there, so an interrupted sweep resumes.",
        epilog="example: LORABOOK_MODE=cpu python -m lorabook.sweep --model encoder "
               "--ranks 1,2,4,8,16,64 --targets q,qv,attn,all --seeds 0,1 "
               "--out benchmarks/results/sweep_encoder_cpu.jsonl")
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--ranks", default="1,2,4,8,16,64", help="comma-separated LoRA ranks r")
    parser.add_argument("--targets", default="q,qv,attn,all",
                        help="comma-separated target sets: q, qv, attn (all attention), all "
                             "(every linear layer of each block)")
    parser.add_argument("--scalings", default="lora",
                        help="lora (alpha/r) and/or rslora (alpha/sqrt(r))")
    parser.add_argument("--bases", default="float", help="storage of W0: float, nf4, fp4, int4")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--out", required=True, help="results file (JSON Lines), created or resumed")
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning runs")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimiser steps per run (default: from the run setting)")
    parser.add_argument("--file-settings", action="store_true",
                        help="run with the settings recorded in --out's first line instead of "
                             "$LORABOOK_MODE's: extends a stored sweep made when the setting of "
                             "that name had other values")
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.file_settings:
        if not Path(args.out).is_file():
            parser.error(f"--file-settings needs an existing results file; {args.out} is not one")
        try:
            settings = RunSettings(**read_results(args.out)[0]["settings"])
        except (ValueError, TypeError, KeyError) as e:
            parser.error(f"--file-settings: {args.out} has no usable settings line ({e})")
    try:
        specs = make_grid(args.model, _ints(args.ranks), _names(args.targets),
                          _names(args.scalings), _names(args.bases), _ints(args.seeds),
                          full=not args.no_full)
        if args.steps is not None:
            specs = [replace(s, steps=args.steps) for s in specs]
    except ValueError as e:  # a bad list or value: a usage error, not a traceback
        parser.error(str(e))
    records = run_sweep(specs, args.out, settings)
    print(f"{len(records)} runs ({settings.mode} setting) in {args.out}")
    table = summarize(records, by=("method", "targets", "r", "scaling", "base"),
                      metrics=("score", "step_s"))
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    return records


if __name__ == "__main__":
    main()
