"""The one training loop every chapter uses: seeded, with a progress bar, timing and memory (chapter 1).

Full fine-tuning, LoRA, QLoRA, adapters and prefix tuning all go through ``train``: what differs
between them is only which parameters have ``requires_grad=True``. The loop takes tokenised items
(dicts of lists or tensors) and a ``collate_fn`` that turns a list of them into a batch of tensors
the model's ``forward(**batch)`` accepts, returning an output with ``.loss``.

The same loop runs on one process or, under ``accelerate launch``, on several (chapter 9): pass an
``accelerate.Accelerator`` as ``accelerator`` and ``lorabook.distributed`` shards each step's global
batch across the processes and weights their losses so that the step is the one a single process
would take. ``python -m lorabook.train`` is the command line (``lorabook.launch``).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from lorabook import bench
from lorabook.config import seed_everything
from lorabook.data import skip_prompt_logits
from lorabook.distributed import LocalProcess, loss_items, loss_weight, shard
from lorabook.loraplus import create_loraplus_optimizer


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (chapter 1). Defaults suit LoRA on the 135M LM."""

    steps: int = 60  # optimiser steps (one batch each)
    lr: float = 2e-4  # peak AdamW learning rate (LoRA paper/QLoRA use 1e-4..2e-4; full FT ~1e-5..5e-5)
    batch_size: int = 8  # items per step (per process and micro-batch when distributed or accumulating)
    gradient_accumulation_steps: int = 1  # micro-batches of batch_size summed into one step
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 5  # linear warm-up, then linear decay to 10% of lr
    max_grad_norm: float | None = 1.0  # gradient clipping (QLoRA recipe: 0.3); None = off
    eval_every: int = 0  # evaluate every N steps (0 = only after the last step)
    seed: int = 0  # seeds data order, dropout and any fresh weights
    optimizer: str = "adamw"  # "adamw" (torch) or "paged_adamw" (bitsandbytes, CUDA only)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    autocast: str | None = None  # "bfloat16": mixed precision (fp32 weights, bf16 matmuls); None = off
    progress: bool = True  # show a tqdm progress bar
    desc: str = "train"  # progress-bar label
    loraplus_lr_ratio: float | None = None  # LoRA+ (chapter 8): B's lr = ratio x lr; None = off

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError(f"steps, batch_size and gradient_accumulation_steps must be >= 1, got "
                             f"{self.steps}, {self.batch_size}, {self.gradient_accumulation_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adamw", "paged_adamw"):
            raise ValueError(f"optimizer must be 'adamw' or 'paged_adamw', got {self.optimizer!r}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}")
        if self.loraplus_lr_ratio is not None and self.optimizer != "adamw":
            raise ValueError("loraplus_lr_ratio is built for optimizer='adamw'")


@dataclass
class History:
    """What a run measured: per-step loss and time, evaluations, parameters, memory (chapter 1)."""

    config: dict
    loss: list[float] = field(default_factory=list)  # training loss per step
    step_time_s: list[float] = field(default_factory=list)  # wall time per step, seconds
    tokens: list[int] = field(default_factory=list)  # non-padding tokens per step
    output_rows: list[int] = field(default_factory=list)  # rows of scores the output layer made per step
    evals: list[dict] = field(default_factory=list)  # {"step": k, **metrics}
    trainable_params: int = 0
    total_params: int = 0
    peak_memory_bytes: int = 0  # CUDA max allocated on GPU; process peak RSS on CPU
    memory_increase_bytes: int = 0  # CPU: max RSS during training minus RSS before; GPU: peak - start
    device: str = "cpu"
    wall_time_s: float = 0.0

    @property
    def median_step_s(self) -> float:
        """Median seconds per optimiser step (the first step, with its warm-up, included)."""
        return statistics.median(self.step_time_s) if self.step_time_s else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Training throughput in non-padding tokens per second."""
        return sum(self.tokens) / max(sum(self.step_time_s), 1e-12)

    @property
    def final_metrics(self) -> dict:
        """The last evaluation's metrics (empty without an eval_fn)."""
        return {k: v for k, v in self.evals[-1].items() if k != "step"} if self.evals else {}

    def summary(self) -> dict:
        """One flat row for a results table."""
        return {
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_%": 100.0 * self.trainable_params / max(self.total_params, 1),
            "first_loss": self.loss[0] if self.loss else math.nan,
            "final_loss": statistics.mean(self.loss[-5:]) if self.loss else math.nan,
            "median_step_s": self.median_step_s,
            "tokens_per_s": self.tokens_per_s,
            "peak_memory_MB": self.peak_memory_bytes / 2**20,
            "memory_increase_MB": self.memory_increase_bytes / 2**20,
            **self.final_metrics,
        }

    def to_dict(self) -> dict:
        """Everything, JSON-ready."""
        return {**asdict(self), "summary": self.summary()}


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters counted once (chapter 1)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device):
    if cfg.optimizer == "paged_adamw":
        if device.type != "cuda":
            raise ValueError("paged_adamw pages optimizer state between GPU and CPU memory: it needs "
                             "CUDA. Use optimizer='adamw' on a CPU.")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.steps - cfg.warmup_steps, 1)
        return 1.0 - 0.9 * (step - cfg.warmup_steps) / span

    return f


def batches(items: Sequence, batch_size: int, seed: int):
    """Endless seeded shuffled batches over ``items``: a new permutation each epoch (chapter 1)."""
    if len(items) < batch_size:
        raise ValueError(f"{len(items)} training items cannot fill a batch of {batch_size}")
    g = torch.Generator().manual_seed(seed)
    while True:  # the last incomplete batch of each epoch is dropped
        order = torch.randperm(len(items), generator=g).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [items[j] for j in order[i:i + batch_size]]


def autocast(device: torch.device, dtype: str | None):
    """``torch.autocast`` on ``device`` in ``dtype`` ("bfloat16"), or a no-op for None (chapter 4)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _checkpointing(model, on: bool) -> None:
    """Activation (gradient) checkpointing on or off, quietly (chapter 6).

    transformers 5 renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*`` (the old
    names warn); the KV cache is switched off while it is on, as transformers would do with a notice.
    """
    if not (hasattr(model, "activation_checkpointing_enable")
            or hasattr(model, "gradient_checkpointing_enable")):
        raise ValueError("gradient_checkpointing needs a transformers model")
    new_api = hasattr(model, "activation_checkpointing_enable")
    config = getattr(model, "config", None)
    if on:
        if config is not None and hasattr(config, "use_cache"):
            model._lorabook_use_cache, config.use_cache = config.use_cache, False
        if new_api:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
        if config is not None and hasattr(model, "_lorabook_use_cache"):
            config.use_cache = model.__dict__.pop("_lorabook_use_cache")


def train(model: torch.nn.Module, items: Sequence, config: TrainConfig,
          collate_fn: Callable[[list], dict],
          eval_fn: Callable[[torch.nn.Module], dict] | None = None,
          accelerator=None,
          after_step: Callable[[torch.nn.Module, torch.optim.Optimizer], None] | None = None) -> History:
    """Train the parameters of ``model`` that require grad; return the measured History (chapter 1).

    ``accelerator``: an ``accelerate.Accelerator`` to run as one of several processes (chapter 9);
    None runs as one plain process. Each step takes a global batch of ``batch_size`` x
    ``gradient_accumulation_steps`` x processes items; the recorded loss is that batch's mean (the
    same on every process). ``eval_fn`` runs on every process (a sharded model needs them all).
    ``after_step(model, optimizer)`` is called after each optimizer step, before the gradients are
    zeroed (chapter 9 counts the training state there).
    """
    acc = accelerator if accelerator is not None else LocalProcess()
    world, accum = acc.num_processes, config.gradient_accumulation_steps
    seed_everything(config.seed + acc.process_index)  # dropout differs by process; data order does not
    device = acc.device if accelerator is not None else next(model.parameters()).device
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    trainable, total = count_trainable(model)
    hist = History(config=asdict(config), trainable_params=trainable, total_params=total,
                   device=str(device))
    if config.gradient_checkpointing:
        _checkpointing(model, True)

    model = acc.prepare(model)  # DDP or FSDP wrapping; params are taken after it (FSDP shards them)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.loraplus_lr_ratio is not None:  # LoRA+: parameter groups as peft builds them
        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=config.lr,
                                        loraplus_lr_ratio=config.loraplus_lr_ratio,
                                        loraplus_weight_decay=config.weight_decay)
    else:
        opt = _make_optimizer(params, config, device)
    opt = acc.prepare(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    stream = batches(items, config.batch_size * accum * world, config.seed)  # the same in every process
    plain = acc.unwrap_model(model)  # the model itself, for its forward's signature
    bench.reset_peak_memory(device)
    sampler = bench.MemorySampler(device)
    was_training = model.training
    model.train()
    t_start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=config.desc, leave=False,
               disable=not (config.progress and acc.is_main_process))
    with sampler:
        for step in bar:
            global_batch = next(stream)
            micro = shard(global_batch, acc.process_index, world, accum)
            whole = collate_fn(global_batch) if world * accum > 1 else None  # counts of the global batch
            parts, weights, counts = [], [], torch.zeros(2, dtype=torch.long)  # tokens, output rows here
            for part in micro:  # counted on the CPU, before the clock starts: no GPU sync in the step
                cpu = collate_fn(part)
                mask, labels = cpu.get("attention_mask"), skip_prompt_logits(plain, cpu).get("labels")
                tokens = int(mask.sum()) if mask is not None else int(cpu["input_ids"].numel())
                counts += torch.tensor([tokens, int(labels.numel()) if labels is not None else tokens])
                if whole is not None:  # this micro-batch's share of the global batch's mean loss
                    weights.append(loss_weight(loss_items(cpu.get("labels"), len(part)),
                                               loss_items(whole.get("labels"), len(global_batch)), world))
                parts.append({k: v.to(device) for k, v in cpu.items()})
            t0 = time.perf_counter()
            step_loss = torch.zeros((), device=device)
            for m, batch in enumerate(parts):
                fed = skip_prompt_logits(plain, batch)  # a causal LM: no output layer on the prompt
                sync = m + 1 == accum  # all-reduce the gradients once, after the last micro-batch
                with (contextlib.nullcontext() if sync else acc.no_sync(model)):
                    with autocast(device, config.autocast):
                        loss = model(**fed).loss
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {step}: lower the learning rate")
                    if weights:
                        loss = loss * weights[m]
                    acc.backward(loss)
                step_loss += loss.detach()
            if config.max_grad_norm:
                acc.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            if after_step is not None:
                after_step(model, opt)
            sched.step()
            opt.zero_grad(set_to_none=True)
            step_loss = acc.reduce(step_loss, "mean")  # the mean over the whole global batch
            counts = acc.reduce(counts.to(device), "sum")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            hist.step_time_s.append(time.perf_counter() - t0)
            hist.loss.append(step_loss.item())
            hist.tokens.append(int(counts[0]))
            hist.output_rows.append(int(counts[1]))
            bar.set_postfix(loss=f"{hist.loss[-1]:.3f}")
            last = step + 1 == config.steps
            if eval_fn is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
                model.eval()
                with autocast(device, config.autocast):
                    hist.evals.append({"step": step + 1, **eval_fn(plain)})
                model.train()
    hist.wall_time_s = time.perf_counter() - t_start
    hist.peak_memory_bytes = bench.peak_memory(device)
    hist.memory_increase_bytes = sampler.increase_bytes
    if config.gradient_checkpointing:
        _checkpointing(plain, False)
    model.train(was_training)
    return hist


if __name__ == "__main__":  # python -m lorabook.train / accelerate launch -m lorabook.train (chapter 9)
    import sys

    from lorabook.launch import main

    main(sys.argv[1:])
