"""Chapter 8's variants as run specs: each runs through sweep.run_one on a tiny model, and the
record's grid of them is well formed (lorabook.sweep, lorabook.record)."""

from __future__ import annotations

import math

import pytest

from lorabook import record, sweep
from lorabook.config import get_settings
from lorabook.lora import DoRALinear, LoRALinear, lora_layers
from lorabook.quant import LinearNF4
from lorabook.sweep import RunSpec
from lorabook.vera import VeRALinear, vera_layers

FAST = get_settings("fast")


# tiny_runs (conftest.py): run_one on tiny models with random data


LAYER = {None: LoRALinear, "dora": DoRALinear, "pissa": LoRALinear, "loftq": LoRALinear,
         "loraplus": LoRALinear}


@pytest.mark.parametrize("variant,base", [("dora", "float"), ("pissa", "float"),
                                          ("pissa", "nf4"), ("loftq", "nf4"),
                                          ("loraplus", "float"), ("dora", "nf4")])
def test_each_lora_variant_runs_through_run_one(tiny_runs, variant, base):
    spec = RunSpec("lm", "lora", 4, "qv", "rslora", base, lr=1e-2, steps=2, variant=variant)
    rec, model = sweep.run_one(spec, FAST, return_model=True)
    layers = dict(lora_layers(model))
    assert len(layers) == 4 and all(type(m) is LAYER[variant] for m in layers.values())
    assert all(isinstance(m.base_layer, LinearNF4) == (base == "nf4") for m in layers.values())
    assert rec["variant"] == variant and rec["key"].endswith(f"variant={variant}")
    assert math.isfinite(rec["final_loss"]) and 0 <= rec["score"] <= 1
    per_layer = sum(4 * (m.in_features + m.out_features) + (m.out_features if variant == "dora"
                                                            else 0) for m in layers.values())
    assert rec["trainable"] == per_layer


def test_pissa_and_loftq_start_from_the_svd(tiny_runs, tiny_llama):
    spec = RunSpec("lm", "lora", 4, "qv", base="nf4", lr=1e-2, steps=1, variant="loftq")
    initial = {}
    sweep.run_one(spec, FAST, before_training=lambda m: initial.update(
        {n: layer.B.detach().clone() for n, layer in lora_layers(m)}))
    assert all(B.abs().max() > 0 for B in initial.values())  # not LoRA's B = 0


def test_loraplus_gives_b_its_own_learning_rate(tiny_runs, monkeypatch):
    seen = {}
    real = sweep.train

    def spy(model, items, cfg, *args, **kwargs):
        seen["ratio"] = cfg.loraplus_lr_ratio
        return real(model, items, cfg, *args, **kwargs)

    monkeypatch.setattr(sweep, "train", spy)
    sweep.run_one(RunSpec("lm", "lora", 2, "qv", lr=1e-3, steps=2, variant="loraplus"), FAST)
    assert seen["ratio"] == sweep.LORAPLUS_RATIO
    sweep.run_one(RunSpec("lm", "lora", 2, "qv", lr=1e-3, steps=2), FAST)
    assert seen["ratio"] is None


@pytest.mark.parametrize("model_name", ["lm", "encoder"])
def test_vera_runs_through_run_one(tiny_runs, model_name):
    spec = RunSpec(model_name, "lora", 16, "all", steps=2, variant="vera")
    assert spec.resolved(FAST).lr == sweep.VERA_LR[model_name]
    rec, model = sweep.run_one(spec, FAST, return_model=True)
    layers = dict(vera_layers(model))
    assert layers and all(isinstance(m, VeRALinear) for m in layers.values())
    head = sum(p.numel() for p in model.classifier.parameters()) if model_name == "encoder" else 0
    assert rec["trainable"] == sum(16 + m.out_features for m in layers.values()) + head
    assert rec["adapter_bytes"] == 4 * rec["trainable"] and rec["scaling_factor"] is None
    assert rec["label"] == "VeRA r=16 on all"


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "adalora"}, "variant must be one of"),
    ({"variant": "loftq"}, "base must be 'nf4'"),
    ({"variant": "vera", "base": "nf4"}, "float base"),
    ({"variant": "dora", "base": "nf4", "dense_base": True}, "dense_base must be None"),
])
def test_bad_variant_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunSpec("lm", "lora", 8, "all", **kwargs)
    with pytest.raises(ValueError, match="method must be 'lora'"):
        RunSpec("lm", "full", variant="dora")


def test_keys_and_labels():
    assert RunSpec("lm", "lora", 8, "all").key() == \
        "lm|lora|r=8|targets=all|scaling=lora|base=float|seed=0"  # old keys unchanged
    spec = RunSpec("lm", "lora", 8, "all", "rslora", "nf4", variant="pissa")
    assert spec.key().endswith("|variant=pissa") and spec.label() == "PiSSA r=8 on all (rslora, nf4)"


def test_variant_grid_of_record():
    lrs = {"lora": 2e-3, "vera": 1e-2, "loraplus": 5e-4}
    specs = record.variant_specs("lm", lrs)
    assert len(specs) == len(set(specs)) == 3 * 11  # 11 runs a seed, seeds 0-2
    labels = {s.label() for s in specs}
    assert {"LoRA r=8 on all (rslora)", "LoRA r=64 on all", "DoRA r=8 on all (rslora)",
            "LoRA+ r=8 on all (rslora)", "PiSSA r=8 on all (rslora)", "VeRA r=256 on all",
            "LoRA r=8 on all (rslora, nf4)", "PiSSA r=8 on all (rslora, nf4)",
            "LoftQ r=8 on all (rslora, nf4)"} <= labels
    lora8 = record.LR_PROBE["lm"]
    main = RunSpec("lm", "lora", lora8["r"], lora8["targets"], lora8["scaling"], lr=2e-3)
    assert main in specs  # the same key as the main grid's LoRA run: shared, not re-run
    assert {s.lr for s in specs if s.variant == "vera"} == {1e-2}
    assert not any(record.keeps_factors(s) for s in specs if s.variant)
    assert all(s.base == "float" for s in record.variant_specs("encoder", lrs))
    val = record.variant_lr_specs("lm")
    assert all(s.split == "val" and s.seed == 0 for s in val)
    assert {s.variant for s in val} == {"vera", "loraplus"}


def test_choose_lr_keeps_variants_apart():
    recs = [{"split": "val", "model": "lm", "method": "lora", "score": 0.5, "lr": 1e-3, "key": "a"},
            {"split": "val", "model": "lm", "method": "lora", "variant": "vera", "score": 0.9,
             "lr": 3e-2, "key": "b"}]
    assert record.choose_lr(recs, "lm", "lora") == (1e-3, ["a"])
    assert record.choose_lr(recs, "lm", "lora", "vera") == (3e-2, ["b"])
    with pytest.raises(ValueError, match="lm/lora/dora"):
        record.choose_lr(recs, "lm", "lora", "dora")


def test_run_variants_needs_stage_one_first(tmp_path):
    with pytest.raises(ValueError, match="stage 1"):
        record.run_variants("lm", tmp_path / "lm_record.jsonl", settings=FAST)


def test_run_variants_takes_loras_rate_from_stage_one_and_writes_its_own_file(tiny_runs, tmp_path,
                                                                              monkeypatch):
    from lorabook.results import append_record, open_results, read_results

    main = tmp_path / "lm_record.jsonl"
    open_results(main, FAST)
    append_record(main, {"key": "probe", "split": "val", "model": "lm", "method": "lora",
                         "score": 0.4, "lr": 7e-3})
    out = tmp_path / "lm_variants_record.jsonl"
    monkeypatch.setattr(record, "run_one", lambda *a, **k: sweep.run_one(
        *a, **{**k, "generation": False}))  # the tiny data have no messages to generate from
    record.run_variants("lm", out, settings=FAST, max_runs=1, lr_from=main)
    runs = read_results(out)[1]
    val, test = [r for r in runs if r["split"] == "val"], [r for r in runs if r["split"] is None]
    assert len(val) == 1 and val[0]["variant"] == "vera"  # the first candidate of stage 1
    assert len(test) == 1 and test[0]["lr"] == 7e-3 and test[0]["variant"] is None
