"""lorabook.models: offline defaults load through from_pretrained; failures say what to do."""

import importlib.util
import json

import pytest
import torch

from lorabook import models


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_sha256_of_a_known_file(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert models.sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_wrong_file_is_refused(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"not the model")
    with pytest.raises(RuntimeError, match="SHA-256"):
        models._check_sha(f, models.LM_GGUF_SHA256)


def test_missing_model_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.LM_PACKAGE else real(name, *a))
    monkeypatch.setenv(models.CACHE_ENV, "/nonexistent-lorabook-cache")
    with pytest.raises(models.ModelPackageMissing, match="requirements-models.txt"):
        models.lm_path()


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        models.load_lm("no-such-org/no-such-model-lorabook")


def test_bad_num_labels():
    with pytest.raises(ValueError, match="num_labels"):
        models.load_encoder(num_labels=0)


@pytest.mark.slow
def test_default_lm_loads_offline_as_a_plain_hf_folder():
    path = models.lm_path()
    marker = json.loads((path / "lorabook_source.json").read_text())
    assert marker["source_sha256"] == models.LM_GGUF_SHA256
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model, tok = models.load_lm()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not model.training and tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_default_encoder_loads_offline():
    model, tok = models.load_encoder(num_labels=3)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.classifier.out_features == 3
    batch = tok(["a fine film", "a dull film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)
