"""Shared fixtures: tiny models built from a config (no download), and the real ones when installed."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LORABOOK_MODE", "fast")


@pytest.fixture
def tiny_llama():
    """A 2-layer Llama with the SmolLM2 layout (GQA, SwiGLU MLP), random weights, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_bert():
    """A 2-layer BERT classifier with the MiniLM layout, random weights, fp32, eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


SMOL_CHAT_TEMPLATE = (  # SmolLM2-Instruct's template (ChatML), as its tokenizer ships it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_char_tokenizer():
    """A 128-token character-level tokenizer with SmolLM2's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]  # ids 0, 1, 2, 3 as in tiny_llama
    chars = [chr(i) for i in range(32, 127)] + ["\n"] + [chr(i) for i in range(161, 189)]  # has £
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = SMOL_CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def char_tok():
    """The character-level tokenizer (ids 0-3 special, as in tiny_llama)."""
    return make_char_tokenizer()


# ---------------------------------------------------------------- sweep.run_one on tiny models


def _tiny_encoder_data(tokenizer, settings, validation=False):
    from lorabook import data

    g = torch.Generator().manual_seed(0)
    items = [{"input_ids": torch.randint(1, 128, (10,), generator=g).tolist(),
              "attention_mask": [1] * 10, "labels": int(i % 2)} for i in range(48)]
    return {"items": items, "collate": data.collate_encoder,
            "test_batches": [data.collate_encoder(items[:16]), data.collate_encoder(items[16:24])]}


def _tiny_lm_data(tokenizer, settings, validation=False):
    from lorabook import data

    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(24):
        ids = torch.randint(3, 128, (12,), generator=g).tolist()  # (T,) token ids
        items.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    return {"items": items[:16], "test_items": items[16:],
            "collate": lambda batch: data.collate_causal(batch, 0)}


@pytest.fixture
def tiny_runs(monkeypatch, tiny_bert, tiny_llama):
    """run_one on the tiny BERT / Llama with random data: the same code path, in milliseconds."""
    import copy

    from lorabook import sweep

    monkeypatch.setattr(sweep, "load_base", lambda spec: (
        copy.deepcopy(tiny_bert if spec.model == "encoder" else tiny_llama), None))
    monkeypatch.setattr(sweep, "encoder_data", _tiny_encoder_data)
    monkeypatch.setattr(sweep, "lm_data", _tiny_lm_data)
