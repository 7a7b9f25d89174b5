"""lorabook.evaluate: scoring in closed form, generation and perplexity on tiny models."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorabook.data import Example, build_prompt, collate_encoder, loan_intent_task, triage_task
from lorabook.evaluate import (
    evaluate_classifier,
    evaluate_task,
    generate,
    parse_record,
    perplexity,
    score_task,
)


@pytest.fixture
def lively_llama(tiny_llama):
    """tiny_llama with large random weights: at init it repeats one token, which tests nothing."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tiny_llama.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return tiny_llama


class ZeroLogits(nn.Module):
    """A stub LM whose next-token distribution is uniform over ``vocab`` tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


# ---------------------------------------------------------------- parsing and scoring


def test_parse_record():
    assert parse_record(' {"a": 1} ') == {"a": 1}
    assert parse_record('Sure! {"a": null} hope that helps') == {"a": None}
    for bad in ("nope", '{"a": ', "[1, 2]", "", '"just a string"'):
        assert parse_record(bad) is None


def test_score_task_closed_form():
    examples = loan_intent_task(0, 4)["test"]
    assert score_task([e.target for e in examples], examples) == {
        "exact_match": 1.0, "valid_json": 1.0, "intent_accuracy": 1.0, "amount_accuracy": 1.0,
        "account_accuracy": 1.0, "field_accuracy": 1.0, "n": 4}

    wrong_intent = dict(examples[1].record, intent="not_an_intent")
    preds = [
        examples[0].target.replace(":", ": "),  # spacing differs: still an exact match
        json.dumps(wrong_intent),  # intent wrong, slots right
        "I cannot help with that.",  # not JSON
        '{"intent": "complaint"}',  # missing keys
    ]
    s = score_task(preds, examples)
    right_3 = examples[3].record["intent"] == "complaint"
    assert s["exact_match"] == 1 / 4
    assert s["valid_json"] == 3 / 4
    assert s["intent_accuracy"] == (1 + right_3) / 4
    assert s["amount_accuracy"] == s["account_accuracy"] == 2 / 4
    assert s["field_accuracy"] == pytest.approx((s["intent_accuracy"] + 2 / 4 + 2 / 4) / 3)


def test_score_task_on_triage_reports_its_fields():
    examples = triage_task(0, 3)["test"]
    preds = [e.target for e in examples[:2]] + [examples[2].target.replace("urgency", "urgent")]
    s = score_task(preds, examples)
    assert s["exact_match"] == 2 / 3 and s["team_accuracy"] == 1.0 and s["urgency_accuracy"] == 2 / 3
    assert "intent_accuracy" not in s


def test_score_task_bad_lengths_raise():
    with pytest.raises(ValueError, match="predictions"):
        score_task(["{}"], loan_intent_task(0, 2)["test"])


# ---------------------------------------------------------------- generation


def test_generate_counts_and_batching(lively_llama, char_tok):
    examples = [Example("triage", "hi " * k, '{"team":"payments","urgency":"low"}') for k in (1, 4, 9)]
    batched = generate(lively_llama, char_tok, examples, max_new_tokens=8, batch_size=2, progress=False)
    single = generate(lively_llama, char_tok, examples, max_new_tokens=8, batch_size=1, progress=False)
    assert len(batched) == 3 and all(isinstance(s, str) for s in batched)
    assert batched == single  # left padding changes nothing
    assert any(batched) and all(len(s) <= 8 for s in batched)  # new tokens only, 1 char each
    assert char_tok.padding_side == "right"


def test_generate_on_a_4bit_base_dequantizes_per_batch_not_per_token(lively_llama, char_tok,
                                                                      monkeypatch):
    from lorabook.quant import LinearNF4, quantize_model

    model = quantize_model(copy.deepcopy(lively_llama))
    n_layers = sum(isinstance(m, LinearNF4) for m in model.modules())
    examples = [Example("triage", "hi " * k, '{"team":"payments","urgency":"low"}') for k in (1, 4, 9)]
    expected = []  # oracle: the same greedy decoding with W0 dequantized at every forward
    for ex in examples:
        ids = torch.tensor([char_tok(build_prompt(char_tok, ex), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 do_sample=False, pad_token_id=char_tok.pad_token_id,
                                 eos_token_id=char_tok.eos_token_id)
        row = out[0, ids.shape[1]:].tolist()
        row = row[:row.index(char_tok.eos_token_id)] if char_tok.eos_token_id in row else row
        expected.append(char_tok.decode(row, skip_special_tokens=True).strip())
    calls = []
    original = LinearNF4.dequantized_weight
    monkeypatch.setattr(LinearNF4, "dequantized_weight",
                        lambda self, dtype=None: calls.append(self) or original(self, dtype))
    assert generate(model, char_tok, examples, max_new_tokens=8, batch_size=1, progress=False) == expected
    assert len(calls) == len(examples) * n_layers  # once per batch (of 1), not per new token


def test_evaluate_task_restores_train_mode(lively_llama, char_tok):
    examples = loan_intent_task(0, 2)["test"]
    lively_llama.train()
    out = evaluate_task(lively_llama, char_tok, examples, max_new_tokens=4, progress=False)
    assert lively_llama.training
    assert len(out["predictions"]) == 2 and out["n"] == 2 and out["exact_match"] == 0.0


# ---------------------------------------------------------------- perplexity and accuracy


def test_uniform_logits_give_perplexity_equal_to_vocab(char_tok):
    texts = ["hello there", "a", "a somewhat longer sentence about loans"]
    assert perplexity(ZeroLogits(128), char_tok, texts, batch_size=2) == pytest.approx(128, rel=1e-6)


def test_perplexity_is_token_weighted(tiny_llama, char_tok):
    texts = ["short one", "a much longer text with many more tokens in it", "mid length"]
    total_nll = total_tokens = 0
    for t in texts:  # oracle: Hugging Face's own mean loss per text, weighted by its token count
        ids = torch.tensor([char_tok(t)["input_ids"]])
        with torch.no_grad():
            total_nll += tiny_llama(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        total_tokens += ids.shape[1] - 1
    tiny_llama.train()
    ppl = perplexity(tiny_llama, char_tok, texts, batch_size=2)
    assert ppl == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert tiny_llama.training
    assert 64 < ppl < 256  # a random model is about as unsure as uniform over 128 tokens


def test_perplexity_truncates_to_max_length(char_tok):
    model = ZeroLogits(128)
    assert perplexity(model, char_tok, ["x" * 500], max_length=16) == pytest.approx(128)
    with pytest.raises(ValueError, match="two or more tokens"):
        perplexity(model, char_tok, ["x"])


def test_evaluate_classifier_matches_manual_argmax(tiny_bert):
    torch.manual_seed(0)
    items = [{"input_ids": torch.randint(5, 128, (n,)).tolist(), "attention_mask": [1] * n,
              "labels": i % 2} for i, n in enumerate([5, 9, 3, 7, 6, 4, 8])]
    batches = [collate_encoder(items[i:i + 3]) for i in range(0, len(items), 3)]
    with torch.no_grad():
        pred = torch.cat([tiny_bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                          .logits.argmax(-1) for b in batches])
    expected = (pred == torch.tensor([it["labels"] for it in items])).float().mean().item()
    tiny_bert.train()
    assert evaluate_classifier(tiny_bert, batches) == pytest.approx(expected)
    assert tiny_bert.training


@pytest.mark.slow
def test_real_model_replies_are_scored():
    """SmolLM2 zero-shot: the pipeline runs end to end on the real model and tokenizer."""
    models = pytest.importorskip("lorabook.models")
    model, tok = models.load_lm()
    side = tok.padding_side
    out = evaluate_task(model, tok, loan_intent_task(0, 4)["test"], max_new_tokens=32, progress=False)
    assert out["n"] == 4 and all(isinstance(p, str) for p in out["predictions"])
    assert tok.padding_side == side
