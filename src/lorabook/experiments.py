"""Standard runs shared by several chapters, with results cached on disk with their provenance.

Chapter 1 fully fine-tunes the base LM on the loan task; chapter 2 studies the weight change that
run made (Delta W = W_finetuned - W0) and chapter 3 compares LoRA with it. So the run lives here,
once: ``full_finetune`` trains and saves it, ``load_full_finetune`` reuses a saved run (or trains one
if none exists). Every cached run carries how it was made: command, config, hardware, versions, commit.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lorabook import data, evaluate, models
from lorabook.config import RunSettings, describe, get_settings
from lorabook.train import History, TrainConfig, train

FULL_FT_LR = 5e-5  # AdamW lr for full fine-tuning of the 135M LM (higher diverges on this task)
MAX_LENGTH = 128  # tokens per training example (prompt + target; the longest is ~120)
EVAL_NEW_TOKENS = 40  # generation budget when scoring: the longest target is 33 tokens + end of turn


def provenance(extra: dict | None = None) -> dict:
    """Command, hardware, versions and git commit of the current run (chapter 1)."""
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"command": " ".join(sys.argv), "commit": commit, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "platform": platform.platform(), **describe(), **(extra or {})}


def task_data(tokenizer, task: str = "loan_intent", settings: RunSettings | None = None,
              seed: int = 0) -> dict:
    """Generated train/test examples of a task and the tokenised training items (chapter 1)."""
    settings = settings or get_settings()
    make = {"loan_intent": data.loan_intent_task, "triage": data.triage_task}
    if task not in make:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(make)}")
    split = make[task](settings.n_train, settings.n_eval, seed=seed)
    return {"train": split["train"], "test": split["test"],
            "items": data.tokenize_causal(tokenizer, split["train"], max_length=MAX_LENGTH)}


def collate_for(tokenizer):
    """The collate function for causal-LM items with this tokenizer's padding id (chapter 1)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return lambda items: data.collate_causal(items, pad)


def score(model, tokenizer, examples, batch_size: int = 8) -> dict:
    """Task scores of greedy generations, without the predictions (chapter 1)."""
    out = evaluate.evaluate_task(model, tokenizer, examples, max_new_tokens=EVAL_NEW_TOKENS,
                                 batch_size=batch_size, progress=False)
    return {k: v for k, v in out.items() if k != "predictions"}


def full_ft_dir(settings: RunSettings | None = None, seed: int = 0) -> Path:
    """Where the full fine-tuning run of this setting and seed is saved (chapter 1)."""
    settings = settings or get_settings()
    return models.cache_dir() / "runs" / f"full_ft_loan_intent_{settings.mode}_seed{seed}"


def full_finetune(model, tokenizer, settings: RunSettings | None = None, seed: int = 0,
                  save: bool = True, progress: bool = True) -> tuple[History, dict]:
    """Fully fine-tune ``model`` in place on the loan task; optionally save it with provenance (chapter 1).

    Returns the History and the held-out scores. Saving replaces an earlier save of the same
    setting and seed: it is a cache of this very run, re-made by re-running it.
    """
    settings = settings or get_settings()
    d = task_data(tokenizer, "loan_intent", settings, seed)
    for p in model.parameters():
        p.requires_grad_(True)
    cfg = TrainConfig(steps=settings.train_steps, lr=FULL_FT_LR, batch_size=settings.batch_size,
                      seed=seed, progress=progress, desc="full fine-tuning")
    hist = train(model, d["items"], cfg, collate_for(tokenizer))
    scores = score(model, tokenizer, d["test"])
    if save:
        out = full_ft_dir(settings, seed)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        record = provenance({"run": "full fine-tuning, loan_intent", "seed": seed,
                             "train_config": asdict(cfg), "history": hist.to_dict(), "scores": scores})
        (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return hist, scores


def load_full_finetune(settings: RunSettings | None = None, seed: int = 0, progress: bool = True):
    """(model, tokenizer, run record) of chapter 1's full fine-tuning, trained now if not saved (chapter 2)."""
    settings = settings or get_settings()
    out = full_ft_dir(settings, seed)
    if not (out / "run.json").exists():
        model, tokenizer = models.load_lm()
        full_finetune(model, tokenizer, settings, seed, save=True, progress=progress)
    record = json.loads((out / "run.json").read_text())
    model, tokenizer = models.load_lm(out)
    return model, tokenizer, record


def linear_weight_names(model, layer_types: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj")) -> list[str]:
    """Names of the decoder's linear weights of the given types, in layer order (chapter 2)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in layer_types]
