"""lorabook.experiments' LoRA runs (chapter 3): what trains, what is saved, when a saved run is reused."""

from __future__ import annotations

import copy
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from lorabook import config, experiments
from lorabook.lora import LoRALinear, lora_layers

TARGETS = experiments.LORA_TARGETS
TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=2)  # all collate_for needs


@pytest.fixture
def tiny_run(monkeypatch, tmp_path):
    """Cache in tmp_path; task data = 16 fixed random sequences for the tiny Llama; a fake score."""
    monkeypatch.setenv("LORABOOK_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(16):
        ids = torch.randint(3, 128, (12,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    monkeypatch.setattr(experiments, "task_data",
                        lambda tok, task, settings=None, seed=0: {"train": [], "test": [],
                                                                  "items": items})
    monkeypatch.setattr(experiments, "score", lambda model, tok, examples: {"exact_match": 0.25})
    return config.get_settings("fast")


def _logits(model) -> torch.Tensor:
    ids = torch.arange(3, 13).view(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_finetune_trains_only_the_adapter_and_saves_it(tiny_llama, tiny_run):
    w0 = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    model = copy.deepcopy(tiny_llama)
    hist, scores = experiments.lora_finetune(model, TOKENIZER, "loan_intent", tiny_run, r=4,
                                             alpha=8, steps=12, progress=False)
    layers = dict(lora_layers(model))
    assert len(layers) == 2 * len(TARGETS)
    # closed form: r * (in + out) per adapted matrix
    assert hist.trainable_params == sum(4 * (m.in_features + m.out_features) for m in layers.values())
    assert hist.loss[-1] < hist.loss[0]
    for name, layer in layers.items():  # W0 frozen and untouched, B moved away from zero
        assert torch.equal(layer.base_layer.weight, w0[f"{name}.weight"])
        assert layer.B.abs().max() > 0
    assert scores == {"exact_match": 0.25}
    out = experiments.lora_dir("loan_intent", tiny_run)
    assert {"adapter_config.json", "adapter_model.safetensors", "run.json"} <= {
        p.name for p in out.iterdir()}
    record = json.loads((out / "run.json").read_text())
    assert {"commit", "command", "torch", "created"} <= set(record)
    assert record["lora"] == {"task": "loan_intent", "r": 4, "alpha": 8, "targets": sorted(TARGETS),
                              "lr": experiments.LORA_LR, "steps": 12,
                              "batch_size": tiny_run.batch_size, "seed": 0}
    assert record["scores"] == scores and len(record["history"]["loss"]) == 12


def test_load_lora_run_reuses_a_matching_run(tiny_llama, tiny_run, monkeypatch):
    trained = copy.deepcopy(tiny_llama)
    experiments.lora_finetune(trained, TOKENIZER, "triage", tiny_run, r=4, alpha=8, steps=6,
                              evaluate=False, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("a saved run with the same settings must not be re-trained")

    monkeypatch.setattr(experiments, "train", no_training)
    model, record = experiments.load_lora_run(copy.deepcopy(tiny_llama), TOKENIZER, "triage",
                                              tiny_run, r=4, alpha=8, steps=6)
    assert record["lora"]["task"] == "triage" and record["scores"] == {}
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(_logits(model), _logits(trained), atol=1e-6, rtol=0)
    assert not torch.allclose(_logits(model), _logits(tiny_llama), atol=1e-4)


def test_load_lora_run_remakes_a_run_with_other_settings(tiny_llama, tiny_run):
    experiments.lora_finetune(copy.deepcopy(tiny_llama), TOKENIZER, "loan_intent", tiny_run, r=4,
                              alpha=8, steps=3, evaluate=False, progress=False)
    model, record = experiments.load_lora_run(copy.deepcopy(tiny_llama), TOKENIZER, "loan_intent",
                                              tiny_run, r=2, alpha=8, steps=3, progress=False)
    assert record["lora"]["r"] == 2 and {layer.r for _, layer in lora_layers(model)} == {2}
    with pytest.raises(TypeError, match="unexpected LoRA settings"):
        experiments.load_lora_run(copy.deepcopy(tiny_llama), TOKENIZER, "loan_intent", tiny_run,
                                  rank=2)


def _save_full_ft_record(settings, **changed) -> dict:
    """A run.json as full_finetune writes it (its setting.* keys), with some settings changed."""
    record = {"scores": {"exact_match": 0.5}, "commit": "abc",
              **{f"setting.{k}": v for k, v in dataclasses.asdict(settings).items()},
              **{f"setting.{k}": v for k, v in changed.items()}}
    out = experiments.full_ft_dir(settings, 0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(record))
    return record


def test_full_ft_record_reads_the_saved_record_without_loading(tiny_run, monkeypatch):
    record = _save_full_ft_record(tiny_run)

    def no_load(*args, **kwargs):
        raise AssertionError("a saved record must be read, not re-made")

    monkeypatch.setattr(experiments.models, "load_lm", no_load)
    assert experiments.full_ft_record(tiny_run) == record



def test_load_full_finetune_loads_the_saved_model(tiny_run, monkeypatch):
    record = _save_full_ft_record(tiny_run)

    def no_training(*args, **kwargs):
        raise AssertionError("a matching saved run must be loaded, not re-made")

    monkeypatch.setattr(experiments, "full_finetune", no_training)
    monkeypatch.setattr(experiments.models, "load_lm", lambda path=None: (path, TOKENIZER))
    model, tokenizer, loaded = experiments.load_full_finetune(tiny_run)
    assert model == experiments.full_ft_dir(tiny_run, 0) and loaded == record

@pytest.mark.parametrize("changed", [{"train_steps": 99}, {"batch_size": 99}, {"n_eval": 99}])
def test_a_full_ft_run_saved_with_other_settings_is_remade(tiny_run, tiny_llama, monkeypatch, changed):
    _save_full_ft_record(tiny_run, **changed)
    made = []

    def remake(model, tokenizer, settings, seed, save, progress):
        made.append(settings)
        _save_full_ft_record(settings)

    monkeypatch.setattr(experiments.models, "load_lm", lambda: (tiny_llama, TOKENIZER))
    monkeypatch.setattr(experiments, "full_finetune", remake)
    record = experiments.full_ft_record(tiny_run)
    assert made == [tiny_run] and record["setting.train_steps"] == tiny_run.train_steps


def test_lora_dir_names_task_mode_and_seed(tiny_run):
    assert experiments.lora_dir("triage", tiny_run, 3).name == "lora_triage_fast_seed3"
    with pytest.raises(ValueError, match="unknown task"):
        experiments.lora_dir("sentiment", tiny_run)


@pytest.mark.slow
def test_lora_on_the_real_model_counts_and_learns(monkeypatch, tmp_path):
    from lorabook import models

    path = models.lm_path()  # the real model from the user's cache (prepared on first use)
    monkeypatch.setenv("LORABOOK_CACHE", str(tmp_path))  # runs go to tmp_path, not the real cache
    model, tok = models.load_lm(path)
    hist, _ = experiments.lora_finetune(model, tok, "loan_intent", config.get_settings("fast"),
                                        steps=6, save=False, evaluate=False, progress=False)
    # SmolLM2-135M: 30 blocks, d=576, k/v 192 (GQA), MLP 1536; r=8 on all 7 matrices
    per_block = 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert hist.trainable_params == 30 * per_block == 2_442_240
    assert min(hist.loss[-2:]) < hist.loss[0]


def test_provenance_names_the_commit_the_code_was_imported_from(monkeypatch):
    """A long run records the commit it ran, even if HEAD moves before it finishes."""
    monkeypatch.delenv("LORABOOK_COMMIT", raising=False)
    assert experiments.LOADED_COMMIT == experiments._git_head()  # read at import, HEAD unchanged
    monkeypatch.setattr(experiments, "_git_head", lambda: "a-later-head")
    monkeypatch.setattr(experiments, "LOADED_COMMIT", "the-imported-one")
    assert experiments.provenance()["commit"] == "the-imported-one"
    monkeypatch.setenv("LORABOOK_COMMIT", "sent-to-a-gpu")
    assert experiments.provenance()["commit"] == "sent-to-a-gpu"


def test_provenance_names_the_cpu_so_that_timings_compare_only_on_the_same_one():
    """One "x86_64" machine here had AMX, a later one only AVX2 (bf16 matmuls eightfold slower)."""
    import torch

    made = experiments.provenance()
    assert made["cpu_model"] and made["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
