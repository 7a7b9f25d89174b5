"""Scoring: greedy generation, JSON exact match, perplexity, classifier accuracy (chapter 1).

Every function runs without gradients and leaves the model in the train/eval mode it found.
"""

from __future__ import annotations

import functools
import json
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorabook.data import Example, build_prompt
from lorabook.quant.linear4bit import dense_weights


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _no_grad_eval(fn):
    """Run ``fn(model, ...)`` in eval mode under inference_mode, then restore model.training."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return wrapper


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so every row ends where generation starts."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[b, T - len(r):] = 1
    return ids, mask


@_no_grad_eval
def generate(model, tokenizer, examples: list[Example], max_new_tokens: int = 48,
             batch_size: int = 32, progress: bool = True) -> list[str]:
    """Greedy completions of each example's chat prompt, new tokens only, stripped (chapter 1).

    Each new token is one forward pass of the whole batch, which costs about as much as one
    row on a CPU: larger batches are faster. A 4-bit base is dequantized once per batch
    (``quant.dense_weights``), not once per token.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    device = _device(model)
    prompts = [build_prompt(tokenizer, ex) for ex in examples]
    outputs = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="generate", disable=not progress or len(starts) < 2):
        rows = tokenizer(prompts[i:i + batch_size], add_special_tokens=False)["input_ids"]
        ids, mask = _left_pad(rows, pad_id)  # (B, T)
        with dense_weights(model):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=eos_id)  # (B, T + new)
        for row in out[:, ids.shape[1]:].tolist():
            if eos_id in row:
                row = row[:row.index(eos_id)]  # stop at the end of the turn
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs


def parse_record(text: str) -> dict | None:
    """The JSON object in a model's reply (the whole reply, else its first {...}), or None (chapter 1)."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")
        if start < 0:
            return None
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def score_task(predictions: list[str], examples: list[Example]) -> dict:
    """Exact match, valid-JSON rate and per-field accuracy (intent_accuracy, ...) of replies (chapter 1)."""
    if len(predictions) != len(examples):
        raise ValueError(f"got {len(predictions)} predictions for {len(examples)} examples")
    n = len(examples)
    if n == 0:
        raise ValueError("score_task needs at least one example")
    keys = list(examples[0].record)
    pairs = [(parse_record(p), ex.record) for p, ex in zip(predictions, examples, strict=True)]
    scores = {
        "exact_match": sum(p == r for p, r in pairs) / n,
        "valid_json": sum(p is not None for p, _ in pairs) / n,
    }
    for k in keys:  # a missing key or unparsable reply counts as wrong
        scores[f"{k}_accuracy"] = sum(p is not None and k in p and p[k] == r.get(k)
                                      for p, r in pairs) / n
    scores["field_accuracy"] = sum(scores[f"{k}_accuracy"] for k in keys) / len(keys)
    scores["n"] = n
    return scores


def evaluate_task(model, tokenizer, examples: list[Example], **generate_kwargs) -> dict:
    """Generate replies and score them: score_task's dict plus "predictions" (chapter 1)."""
    predictions = generate(model, tokenizer, examples, **generate_kwargs)
    return {**score_task(predictions, examples), "predictions": predictions}


@_no_grad_eval
def perplexity(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 8) -> float:
    """exp(mean next-token NLL), weighted by tokens over all texts, each cut to max_length (chapter 5)."""
    if not texts:
        raise ValueError("perplexity needs at least one text")
    device = _device(model)
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        T = max(len(r) for r in batch)
        ids = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
        for b, r in enumerate(batch):
            ids[b, :len(r)] = torch.as_tensor(r)
            mask[b, :len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        keep = mask[:, 1:].bool()  # a token counts when it and its context are real
        total_nll += nll[keep].sum().item()
        total_tokens += int(keep.sum())
    if total_tokens == 0:
        raise ValueError("no text has two or more tokens: nothing to predict")
    return math.exp(total_nll / total_tokens)


@_no_grad_eval
def classifier_correct(model, batches) -> list[int]:
    """1 or 0 per example: is argmax(logits) batch["labels"]? In order, over all batches (chapter 4)."""
    device = _device(model)
    correct: list[int] = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")  # (B,)
        pred = model(**batch).logits.argmax(dim=-1)  # (B,)
        correct += (pred == labels).int().tolist()
    if not correct:
        raise ValueError("evaluate_classifier got no examples")
    return correct


def evaluate_classifier(model, batches) -> float:
    """Accuracy of argmax(logits) against batch["labels"] over an iterable of batches (chapter 1)."""
    correct = classifier_correct(model, batches)
    return sum(correct) / len(correct)
