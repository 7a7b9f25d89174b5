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
