"""Standard runs shared by several chapters, with results cached on disk with their provenance.

Chapter 1 fully fine-tunes the base LM on the loan task; chapter 2 studies the weight change that
run made (Delta W = W_finetuned - W0) and chapter 3 compares LoRA with it. So the run lives here,
once: ``full_finetune`` trains and saves it, ``load_full_finetune`` reuses a saved run (or trains one
if none exists). Every cached run carries how it was made: command, config, hardware, versions, commit.
"""

from __future__ import annotations

import json
import os
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


def _git_head() -> str:
    """The repository's HEAD commit, or "" outside a git checkout."""
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# Read once, when the code is imported: a run of half an hour records the commit whose code it
# ran, not the one checked out when it finished (a record of 2026-12-05 named the later one).
LOADED_COMMIT = _git_head()


def provenance(extra: dict | None = None) -> dict:
    """Command, hardware, versions and git commit of the current run (chapter 1)."""
    # A copy of the tree sent elsewhere (a lent GPU machine) may carry a stale .git or none:
    # $LORABOOK_COMMIT, when set, names the commit that was sent.
    commit = os.environ.get("LORABOOK_COMMIT") or LOADED_COMMIT or "unknown"
    # a worker process (python -m lorabook.record --workers N) records the command that started it
    command = os.environ.get("LORABOOK_PARENT_COMMAND") or " ".join(sys.argv)
    return {"command": command, "commit": commit, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "platform": platform.platform(), **describe(), **cpu_identity(), **(extra or {})}


def cpu_identity() -> dict:
    """The CPU's model name and the vector instructions torch uses on it (chapter 1): two
    machines of one platform string can differ eightfold in bf16 speed (AVX2 against AMX), so a
    timing is compared only between runs whose CPU is the same (``evidence.four_bit_path_costs``)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def task_data(tokenizer, task: str = "loan_intent", settings: RunSettings | None = None,
              seed: int = 0, validation: bool = False) -> dict:
    """Generated train/test examples of a task and the tokenised training items (chapter 1).

    ``validation=True``: "train" and "test" come from the validation split of the training
    templates (``tasks.loan_intent_task``), for choosing a learning rate (chapter 4).
    """
    settings = settings or get_settings()
    make = {"loan_intent": data.loan_intent_task, "triage": data.triage_task}
    if task not in make:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(make)}")
    split = make[task](settings.n_train, settings.n_eval, seed=seed, validation=validation)
    return {"train": split["train"], "test": split["test"],
            "items": data.tokenize_causal(tokenizer, split["train"], max_length=MAX_LENGTH)}


def collate_for(tokenizer):
    """The collate function for causal-LM items with this tokenizer's padding id (chapter 1)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return lambda items: data.collate_causal(items, pad)


def score(model, tokenizer, examples, batch_size: int = 32) -> dict:
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


# The settings a full fine-tuning run depends on: a saved run made with other values is re-made.
FULL_FT_SETTINGS = ("train_steps", "batch_size", "n_train", "n_eval")


def _saved_full_ft(settings: RunSettings, seed: int) -> dict | None:
    """The saved run.json of this setting and seed, or None if absent or made with other settings."""
    path = full_ft_dir(settings, seed) / "run.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    same = all(record.get(f"setting.{k}") == getattr(settings, k) for k in FULL_FT_SETTINGS)
    return record if same else None


def load_full_finetune(settings: RunSettings | None = None, seed: int = 0, progress: bool = True):
    """(model, tokenizer, run record) of chapter 1's full fine-tuning, trained now if not saved (chapter 2).

    A saved run is reused only if it was made with this setting's steps, batch size and data
    sizes (``FULL_FT_SETTINGS``); otherwise it is trained again and replaces the saved one.
    """
    settings = settings or get_settings()
    record = full_ft_record(settings, seed, progress)  # trains and saves the run if needed
    model, tokenizer = models.load_lm(full_ft_dir(settings, seed))
    return model, tokenizer, record


def linear_weight_names(model, layer_types: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj")) -> list[str]:
    """Names of the decoder's linear weights of the given types, in layer order (chapter 2)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in layer_types]


# ---------------------------------------------------------------- LoRA runs (chapter 3)

LORA_LR = 2e-3  # AdamW lr for LoRA (r=8, alpha=16) on the 135M LM: ~40x FULL_FT_LR, tried in cpu mode
LORA_R, LORA_ALPHA = 8, 16  # rank and alpha of the book's standard adapter (scaling alpha/r = 2)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj",  # every linear layer of each block:
                "gate_proj", "up_proj", "down_proj")  # QLoRA found attention-only falls short


def full_ft_record(settings: RunSettings | None = None, seed: int = 0,
                   progress: bool = True) -> dict:
    """Chapter 1's saved full fine-tuning run record (run.json), trained now if absent (chapter 3).

    A saved run made with other settings (``FULL_FT_SETTINGS``) is trained again and replaced.
    Unlike ``load_full_finetune`` it does not load the fine-tuned model when the run is saved.
    """
    settings = settings or get_settings()
    record = _saved_full_ft(settings, seed)
    if record is None:
        model, tokenizer = models.load_lm()
        full_finetune(model, tokenizer, settings, seed, save=True, progress=progress)
        del model
        record = json.loads((full_ft_dir(settings, seed) / "run.json").read_text())
    return record


def lora_dir(task: str = "loan_intent", settings: RunSettings | None = None, seed: int = 0) -> Path:
    """Where the LoRA adapter of this task, setting and seed is saved (chapter 3)."""
    settings = settings or get_settings()
    if task not in ("loan_intent", "triage"):
        raise ValueError(f"unknown task {task!r}; expected 'loan_intent' or 'triage'")
    return models.cache_dir() / "runs" / f"lora_{task}_{settings.mode}_seed{seed}"


def _lora_run_config(task: str, r: int, alpha: float, targets, lr: float, steps: int,
                     batch_size: int, seed: int) -> dict:
    """The settings that identify a cached LoRA run: a saved run is reused only if they all match."""
    return {"task": task, "r": r, "alpha": alpha, "targets": sorted(targets), "lr": lr,
            "steps": steps, "batch_size": batch_size, "seed": seed}


def lora_finetune(model, tokenizer, task: str = "loan_intent", settings: RunSettings | None = None,
                  r: int = LORA_R, alpha: float = LORA_ALPHA,
                  targets: tuple[str, ...] | list[str] = LORA_TARGETS, lr: float = LORA_LR,
                  steps: int | None = None, seed: int = 0, save: bool = True,
                  evaluate: bool = True, progress: bool = True) -> tuple[History, dict]:
    """Put LoRA on ``model`` in place and train it on ``task``; optionally save adapter + run.json (chapter 3).

    Only A and B train (W0 frozen). ``steps`` defaults to ``settings.train_steps``. Returns the
    History and the held-out scores (empty with ``evaluate=False``). The adapter is saved in
    peft's format in ``lora_dir(task, settings, seed)`` with a run.json of its provenance,
    replacing an earlier save: a cache of this very run.
    """
    from lorabook.adapter_io import save_adapter
    from lorabook.config import seed_everything
    from lorabook.lora import apply_lora

    settings = settings or get_settings()
    steps = settings.train_steps if steps is None else steps
    d = task_data(tokenizer, task, settings, seed)
    seed_everything(seed)  # A's random init
    apply_lora(model, list(targets), r=r, alpha=alpha)
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=settings.batch_size, seed=seed,
                      progress=progress, desc=f"LoRA r={r} on {task}")
    hist = train(model, d["items"], cfg, collate_for(tokenizer))
    scores = score(model, tokenizer, d["test"]) if evaluate else {}
    if save:
        out = lora_dir(task, settings, seed)
        save_adapter(model, out, overwrite=True)
        record = provenance({
            "run": f"LoRA, {task}", "seed": seed,
            "lora": _lora_run_config(task, r, alpha, targets, lr, steps, settings.batch_size, seed),
            "train_config": asdict(cfg), "history": hist.to_dict(), "scores": scores})
        (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return hist, scores


def load_lora_run(model, tokenizer, task: str = "loan_intent", settings: RunSettings | None = None,
                  seed: int = 0, progress: bool = True, **lora_kwargs) -> tuple[object, dict]:
    """(model with the saved LoRA adapter loaded, run record); trains and saves it first if absent (chapter 3).

    ``lora_kwargs`` (r, alpha, targets, lr, steps) are those of ``lora_finetune``; a saved run made
    with other settings is not reused but re-made.
    """
    from lorabook.adapter_io import load_adapter

    settings = settings or get_settings()
    kw = {"r": LORA_R, "alpha": LORA_ALPHA, "targets": LORA_TARGETS, "lr": LORA_LR,
          "steps": settings.train_steps, **lora_kwargs}
    unknown = set(kw) - {"r", "alpha", "targets", "lr", "steps"}
    if unknown:
        raise TypeError(f"unexpected LoRA settings {sorted(unknown)}; expected r, alpha, targets, "
                        "lr, steps")
    wanted = _lora_run_config(task, kw["r"], kw["alpha"], kw["targets"], kw["lr"], kw["steps"],
                              settings.batch_size, seed)
    out = lora_dir(task, settings, seed)
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else None
    if record is not None and record.get("lora") == wanted:
        load_adapter(model, out)
        return model, record
    lora_finetune(model, tokenizer, task, settings, seed=seed, save=True, progress=progress, **kw)
    return model, json.loads((out / "run.json").read_text())
