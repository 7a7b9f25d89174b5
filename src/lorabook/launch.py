"""The training command line: full fine-tuning, LoRA or QLoRA on the loan task, on one process or many (chapter 9).

    python -m lorabook.train --method lora --out runs/lora                       # one process
    accelerate launch --num_processes 2 -m lorabook.train --method lora --out runs/lora   # two GPUs

Every process builds the same model and data (same seed) and trains its slice of each batch
through ``train.train``; only the main process writes (the adapter or model, ``run.json``) and
scores the held-out set. ``--batch-size`` is per process and micro-batch: the step's batch is
batch size x gradient accumulation x processes. ``--tiny`` swaps the base model for a two-block
Llama of the same vocabulary with random weights, to check the plumbing in seconds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from lorabook import experiments, models
from lorabook.config import get_settings, seed_everything
from lorabook.distributed import get_accelerator, is_fsdp
from lorabook.train import TrainConfig, train

METHODS = ("full", "lora", "qlora")


def tiny_like(model) -> torch.nn.Module:
    """A two-block Llama with ``model``'s vocabulary and special tokens, random weights (chapter 9)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    return LlamaForCausalLM(cfg)


def prepare(model, method: str, r: int, alpha: float):
    """Open the weights ``method`` trains: all (full), LoRA adapters, or LoRA on an NF4 base (chapter 9)."""
    from lorabook import qlora
    from lorabook.lora import apply_lora

    if method == "full":
        model.requires_grad_(True)
    elif method == "lora":
        apply_lora(model, list(experiments.LORA_TARGETS), r=r, alpha=alpha)
    elif method == "qlora":
        qlora.qlora_model(model, r=r, alpha=alpha, targets=experiments.LORA_TARGETS)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return model


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's arguments (chapter 9)."""
    p = argparse.ArgumentParser(prog="python -m lorabook.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--out", type=Path, required=True, help="folder for the adapter/model and run.json")
    p.add_argument("--mode", default=None, help="run setting: fast, cpu, gpu, record ($LORABOOK_MODE)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the setting's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="items per process and micro-batch (default: the setting's batch / processes)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="default: the book's lr for the method")
    p.add_argument("--r", type=int, default=experiments.LORA_R)
    p.add_argument("--alpha", type=float, default=experiments.LORA_ALPHA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a path or hub id (default: the offline SmolLM2-135M)")
    p.add_argument("--tiny", action="store_true", help="a two-block random Llama: checks the plumbing")
    p.add_argument("--no-eval", action="store_true", help="skip scoring the held-out examples")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP (as accelerate's --use_fsdp)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Train as the command line says; the main process writes and returns run.json's record (chapter 9)."""
    args = parse(argv)
    acc = get_accelerator(args.fsdp or None)
    sharded = is_fsdp(acc)
    if sharded and args.method != "full":
        raise ValueError("this command line shards full fine-tuning only (FSDP); LoRA and QLoRA keep "
                         "their small adapters whole: run them without --fsdp / --use_fsdp")
    settings = get_settings(args.mode)
    steps = args.steps or settings.train_steps
    batch = args.batch_size or max(settings.batch_size // (acc.num_processes * args.grad_accum), 1)
    lr = args.lr or (experiments.FULL_FT_LR if args.method == "full" else experiments.LORA_LR)
    model, tokenizer = models.load_lm(args.model)
    if args.tiny:
        torch.manual_seed(args.seed)
        model = tiny_like(model).to(next(model.parameters()).device)
    seed_everything(args.seed)  # LoRA's A: the same in every process
    prepare(model, args.method, args.r, args.alpha)
    data = experiments.task_data(tokenizer, "loan_intent", replace(settings, batch_size=batch), args.seed)
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch, gradient_accumulation_steps=args.grad_accum,
                      seed=args.seed, progress=True, desc=f"{args.method} x{acc.num_processes}")
    hist = train(model, data["items"], cfg, experiments.collate_for(tokenizer),
                 accelerator=acc if acc.num_processes > 1 else None)
    full_state = None
    if args.method == "full" and sharded:
        full_state = acc.get_state_dict(model)  # gathered from the shards: every process takes part
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return None
    plain = acc.unwrap_model(model)
    # Generation with a sharded model needs every process: scoring is left to a later, plain run.
    scores = {} if args.no_eval or sharded else experiments.score(plain, tokenizer, data["test"])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.method == "full":  # under FSDP, the state dict gathered above
        plain.save_pretrained(args.out, state_dict=full_state)
        tokenizer.save_pretrained(args.out)
    else:
        from lorabook.adapter_io import save_adapter

        save_adapter(plain, args.out, overwrite=True)
    record = experiments.provenance({
        "run": f"{args.method}, loan_intent", "processes": acc.num_processes,
        "global_batch": batch * args.grad_accum * acc.num_processes, "tiny": args.tiny,
        "train_config": asdict(cfg), "history": hist.to_dict(), "scores": scores})
    (args.out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    acc.wait_for_everyone()
    return record
