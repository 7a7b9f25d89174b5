"""lorabook.sweep: run specs and grids, one run on tiny and real models, resumable sweeps, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from lorabook import config, results, sweep
from lorabook import train as train_module
from lorabook.lora import LoRALinear, lora_layers
from lorabook.quant import LinearNF4
from lorabook.sweep import RunSpec

FAST = config.get_settings("fast")


# ---------------------------------------------------------------- specs and grids


def test_target_sets_name_every_block_linear_and_never_the_head(tiny_bert, tiny_llama):
    for model, kind, head in ((tiny_bert, "encoder", "classifier"), (tiny_llama, "lm", "lm_head")):
        linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        in_blocks = {n for n in linear if (".layer." if kind == "encoder" else ".layers.") in n}
        for name, targets in sweep.TARGET_SETS[kind].items():
            m = copy.deepcopy(model)
            sweep.apply_lora(m, targets, r=2, alpha=4)
            wrapped = {n for n, _ in lora_layers(m)}
            assert wrapped <= in_blocks, (kind, name, wrapped - in_blocks)
            assert not any(n.endswith(head) for n in wrapped)
            leaves = {n.rsplit(".", 1)[-1] if kind == "lm" else n.split(".", 4)[-1] for n in wrapped}
            expected = {"q": 1, "qv": 2, "attn": 4, "all": 6 if kind == "encoder" else 7}[name]
            assert len(leaves) == expected, (kind, name, leaves)
            assert len(wrapped) == expected * 2  # both layers of the tiny models
        m = sweep.apply_lora(copy.deepcopy(model), sweep.TARGET_SETS[kind]["all"], r=2, alpha=4)
        assert {n for n, _ in lora_layers(m)} == in_blocks  # every linear of the blocks


def test_lora_parameter_count_is_what_apply_lora_trains(tiny_bert, tiny_llama):
    for model, kind in ((tiny_bert, "encoder"), (tiny_llama, "lm")):
        for targets, names in sweep.TARGET_SETS[kind].items():
            m = sweep.apply_lora(copy.deepcopy(model), names, r=3, alpha=3)
            trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
            assert sweep.lora_parameter_count(model, kind, targets, 3) == trainable
    with pytest.raises(ValueError, match="unknown target set"):
        sweep.lora_parameter_count(tiny_bert, "encoder", "q_proj", 1)


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "gpt"}, "model must be one of"),
    ({"method": "ia3"}, "method must be one of"),
    ({"r": 0}, "rank r >= 1"),
    ({"r": 2.0}, "rank r >= 1"),
    ({"r": True}, "rank r >= 1"),
    ({"r": None}, "rank r >= 1"),
    ({"targets": "mlp"}, "targets must be one of"),
    ({"targets": "q_proj"}, "targets must be one of"),  # a module name, not a set's key
    ({"scaling": "dora"}, "scaling must be one of"),
    ({"base": "int8"}, "base must be one of"),
    ({"seed": -1}, "seed"),
    ({"alpha": 0}, "alpha must be a positive"),
    ({"lr": -1e-3}, "lr must be a positive"),
    ({"steps": 0}, "steps must be a positive"),
    ({"steps": 2.5}, "steps must be a positive int"),
])
def test_bad_lora_specs_raise_clear_errors(kwargs, message):
    spec = {"model": "encoder", "method": "lora", "r": 4, "targets": "qv"} | kwargs
    with pytest.raises(ValueError, match=message):
        RunSpec(**spec)


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 8}, "full fine-tuning has no r"),
    ({"targets": "qv"}, "full fine-tuning has no targets"),
    ({"alpha": 16}, "full fine-tuning has no alpha"),
    ({"scaling": "rslora"}, "no LoRA scaling"),
    ({"base": "nf4"}, "needs base='float'"),
])
def test_full_fine_tuning_takes_no_lora_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunSpec("lm", "full", **kwargs)


def test_keys_are_stable_distinct_and_resolved_with_the_defaults():
    spec = RunSpec("lm", "lora", 8, "qv")
    assert spec.key() == "lm|lora|r=8|targets=qv|scaling=lora|base=float|seed=0"
    full = RunSpec("lm", "full", scaling="lora")
    assert full.scaling is None and full == RunSpec("lm", "full")  # one canonical spec
    done = spec.resolved(FAST)
    assert (done.alpha, done.lr, done.steps) == (sweep.ALPHA["lm"], sweep.LORA_LR["lm"],
                                                 FAST.train_steps)
    assert done.key().endswith(f"|alpha={done.alpha!r}|lr={done.lr!r}|steps={FAST.train_steps}")
    enc = RunSpec("encoder", "full").resolved(FAST)
    assert (enc.alpha, enc.lr, enc.steps) == (None, sweep.FULL_LR["encoder"], FAST.encoder_steps)
    assert RunSpec("lm", "lora", 8, "qv", alpha=16).alpha == 16.0  # ints stored as floats
    assert RunSpec("lm", "lora", 8, "qv", alpha=16).key() == RunSpec("lm", "lora", 8, "qv",
                                                                       alpha=16.0).key()
    grid = sweep.make_grid("lm", ranks=(1, 2), targets=("q", "all"), scalings=("lora", "rslora"),
                           bases=("float", "nf4"), seeds=(0, 1))
    keys = [s.resolved(FAST).key() for s in grid]
    assert len(set(keys)) == len(keys)


def test_scaling_factor_is_alpha_over_r_or_sqrt_r():
    assert RunSpec("lm", "lora", 16, "q", alpha=16).scaling_factor == 1.0
    assert RunSpec("lm", "lora", 16, "q", "rslora", alpha=16).scaling_factor == 4.0
    assert RunSpec("lm", "full").resolved(FAST).scaling_factor is None


def test_make_grid_counts_orders_and_validates():
    grid = sweep.make_grid("encoder", ranks=(1, 4), targets=("q", "all"), seeds=(0, 3))
    assert len(grid) == 2 * (1 + 2 * 2)
    assert grid[0] == RunSpec("encoder", "full", seed=0)  # the reference first, seed by seed
    assert grid[5] == RunSpec("encoder", "full", seed=3)
    assert grid[1:5] == [RunSpec("encoder", "lora", r, t, seed=0)
                         for t in ("q", "all") for r in (1, 4)]
    no_full = sweep.make_grid("lm", ranks=(8,), targets=("qv",), scalings=("lora", "rslora"),
                              bases=("float", "nf4"), full=False)
    assert len(no_full) == 4 and all(s.method == "lora" for s in no_full)
    with pytest.raises(ValueError, match="ranks must not be empty"):
        sweep.make_grid("lm", ranks=())
    with pytest.raises(ValueError, match="duplicates"):
        sweep.make_grid("lm", ranks=(2, 2))
    with pytest.raises(ValueError, match="targets must be one of"):
        sweep.make_grid("lm", targets=("query",))  # the encoder's name, not the LM's


# ---------------------------------------------------------------- one run, on tiny models


# the tiny_runs fixture (conftest.py) gives run_one tiny models and random data


def test_run_one_records_everything_and_rslora_reaches_the_layers(tiny_runs):
    spec = RunSpec("encoder", "lora", 4, "all", "rslora", alpha=8, lr=1e-2, steps=6, seed=1)
    record, model = sweep.run_one(spec, FAST, return_model=True)
    layers = dict(lora_layers(model))
    assert len(layers) == 12
    assert all(layer.scaling == pytest.approx(8 / math.sqrt(4)) for layer in layers.values())
    head = sum(p.numel() for p in model.classifier.parameters())
    closed_form = sum(4 * (m.in_features + m.out_features) for m in layers.values()) + head
    assert record["trainable"] == closed_form and record["adapter_bytes"] == 4 * closed_form
    assert all(p.requires_grad for p in model.classifier.parameters())  # the head trains
    assert record["key"] == spec.resolved(FAST).key() and record["seed"] == 1
    assert record["scaling_factor"] == pytest.approx(4.0) and record["steps"] == 6
    assert 0.0 <= record["score"] == record["accuracy"] <= 1.0
    assert len(record["train_loss"]) == 6 and record["step_s"] > 0 and record["train_s"] > 0
    assert {"commit", "command", "torch"} <= set(record["provenance"])
    json.dumps(record)  # everything is JSON-ready


def test_run_one_lm_scores_teacher_forced_and_full_ft_trains_everything(tiny_runs, tiny_llama):
    lora = sweep.run_one(RunSpec("lm", "lora", 2, "qv", lr=1e-2, steps=4), FAST)
    assert lora["score"] == lora["exact"] and 0 <= lora["token_accuracy"] <= 1
    assert math.isfinite(lora["loss"]) and lora["scaling_factor"] == sweep.ALPHA["lm"] / 2
    full = sweep.run_one(RunSpec("lm", "full", steps=2), FAST)
    total = sum(p.numel() for p in tiny_llama.parameters())  # tied embedding counted once
    assert full["trainable"] == full["total"] == total
    assert full["adapter_bytes"] == 4 * total and full["r"] is None


@pytest.mark.parametrize("base", ["nf4", "int4"])
def test_run_one_on_a_4bit_base_trains_lora_over_frozen_codes(tiny_runs, base):
    record, model = sweep.run_one(RunSpec("lm", "lora", 2, "all", base=base, lr=1e-2, steps=3),
                                  FAST, return_model=True)
    layers = dict(lora_layers(model))
    assert all(isinstance(layer.base_layer, LinearNF4) and layer.base_layer.quant_type == base
               for layer in layers.values())
    assert (layers["model.layers.0.self_attn.q_proj"].base_layer.absmax2 is not None) == (base == "nf4")
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head is never quantized
    assert any(layer.B.abs().max() > 0 for layer in layers.values())
    assert record["base"] == base and math.isfinite(record["final_loss"])


def test_keeping_factors_keeps_the_named_layers_of_each_lora_run(tiny_runs, tmp_path):
    store = {}
    runner = sweep.keeping_factors(["layer.1.attention.self.query"], store)
    specs = [RunSpec("encoder", "full", steps=2), RunSpec("encoder", "lora", 3, "qv", steps=3)]
    records = sweep.run_sweep(specs, tmp_path / "runs.jsonl", FAST, progress=False, runner=runner)
    assert list(store) == [records[1]["key"]]  # full fine-tuning has no factors
    (name, kept), = store[records[1]["key"]].items()
    assert name == "bert.encoder.layer.1.attention.self.query"
    assert kept["A"].shape == (3, 32) and kept["B"].shape == (32, 3) and kept["W0"].shape == (32, 32)
    assert kept["scaling"] == sweep.ALPHA["encoder"] / 3 and kept["B"].abs().max() > 0
    assert kept["A_init"].shape == (3, 32) and not torch.equal(kept["A_init"], kept["A"])


def test_stored_results_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABOOK_RESULTS", str(tmp_path))
    assert sweep.stored_results("encoder") is None
    (tmp_path / "sweep_encoder_cpu.jsonl").write_text("{}")
    assert sweep.stored_results("encoder") == tmp_path / "sweep_encoder_cpu.jsonl"
    assert sweep.stored_results("lm") is None and sweep.stored_results("encoder", "gpu") is None
    with pytest.raises(ValueError, match="model must be one of"):
        sweep.stored_results("bert")


# ---------------------------------------------------------------- sweeps and the results file


class CountingRunner:
    """A fake run_one: a record with a score made from the rank; fails at call number fail_at."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, spec, settings=None):
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        self.calls.append(spec.key())
        return {"key": spec.key(), **vars(spec), "score": 0.5 + 0.01 * (spec.r or 40),
                "step_s": 0.1}


def test_run_sweep_appends_and_resumes_where_it_stopped(tmp_path):
    path = tmp_path / "sweep.jsonl"
    grid = sweep.make_grid("encoder", ranks=(1, 2), targets=("q", "qv"), seeds=(0,))
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(grid, path, FAST, progress=False, runner=CountingRunner(fail_at=3))
    assert len(results.load_results(path)) == 2  # the two finished runs survived
    runner = CountingRunner()
    records = sweep.run_sweep(grid + grid[:1], path, FAST, progress=False, runner=runner)
    assert len(runner.calls) == len(grid) - 2  # only the missing runs ran, duplicates once
    assert [r["key"] for r in records] == [s.resolved(FAST).key() for s in grid]
    again = CountingRunner()
    assert sweep.run_sweep(grid, path, FAST, progress=False, runner=again) == records
    assert again.calls == []
    header = json.loads(path.read_text().splitlines()[0])
    assert header["format"] == "lorabook-sweep" and header["mode"] == "fast"


def test_run_sweep_counts_steps_in_the_key_and_refuses_other_settings(tmp_path):
    path = tmp_path / "sweep.jsonl"
    spec = RunSpec("encoder", "lora", 4, "q")
    sweep.run_sweep([spec], path, FAST, progress=False, runner=CountingRunner())
    runner = CountingRunner()
    sweep.run_sweep([RunSpec("encoder", "lora", 4, "q", steps=3)], path, FAST, progress=False,
                    runner=runner)
    assert len(runner.calls) == 1  # other steps: another run
    with pytest.raises(ValueError, match="not with the 'cpu' settings"):
        sweep.run_sweep([spec], path, config.get_settings("cpu"), progress=False,
                        runner=CountingRunner())


def test_run_sweep_refuses_foreign_and_corrupt_files(tmp_path):
    foreign = tmp_path / "other.jsonl"
    foreign.write_text('{"some": "data"}\n')
    with pytest.raises(ValueError, match="other.jsonl, line 1"):
        sweep.run_sweep([RunSpec("lm", "full")], foreign, FAST, progress=False,
                        runner=CountingRunner())
    assert foreign.read_text() == '{"some": "data"}\n'
    path = tmp_path / "sweep.jsonl"
    sweep.run_sweep([RunSpec("lm", "full")], path, FAST, progress=False, runner=CountingRunner())
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="sweep.jsonl, line 3: corrupt"):
        sweep.run_sweep([RunSpec("lm", "full")], path, FAST, progress=False,
                        runner=CountingRunner())


def test_the_command_line_runs_a_grid_and_prints_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORABOOK_MODE", "fast")
    monkeypatch.setattr(sweep, "run_one", CountingRunner())
    out = tmp_path / "cli.jsonl"
    records = sweep.main(["--model", "lm", "--ranks", "1,4", "--targets", "q,all", "--seeds", "0,1",
                          "--out", str(out), "--steps", "2", "--no-full"])
    assert len(records) == 8 and all(r["steps"] == 2 for r in records)
    printed = capsys.readouterr().out
    assert f"8 runs (fast setting) in {out}" in printed and "score_mean" in printed
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--help"])
    assert exit_.value.code == 0
    assert "resumes" in capsys.readouterr().out
    for bad in (["--ranks", "1,x"], ["--targets", "mlp"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as exit_:
            sweep.main(["--model", "lm", "--out", str(out), *bad])
        assert exit_.value.code == 2  # argparse's usage error


def test_the_command_line_extends_a_file_with_the_settings_it_was_made_with(tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("LORABOOK_MODE", "fast")
    monkeypatch.setattr(sweep, "run_one", CountingRunner())
    out = tmp_path / "old.jsonl"
    old = dataclasses.replace(FAST, train_steps=FAST.train_steps + 3)  # the setting, as it once was
    sweep.run_sweep([RunSpec("lm", "lora", 1, "q")], out, old, progress=False)
    with pytest.raises(ValueError, match="mixing them would compare unlike runs"):
        sweep.main(["--model", "lm", "--ranks", "2", "--targets", "q", "--no-full", "--out", str(out)])
    records = sweep.main(["--model", "lm", "--ranks", "2", "--targets", "q", "--no-full",
                          "--out", str(out), "--file-settings"])
    assert [r["r"] for r in records] == [2]
    assert records[0]["steps"] == old.train_steps  # the file's steps, not today's fast setting's
    assert len(sweep.load_results(out)) == 2
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--model", "lm", "--out", str(tmp_path / "none.jsonl"), "--file-settings"])
    assert exit_.value.code == 2
    assert "needs an existing results file" in capsys.readouterr().err


# ---------------------------------------------------------------- the real models, fast setting


@pytest.mark.slow
def test_run_one_on_the_real_encoder():
    record, model = sweep.run_one(RunSpec("encoder", "lora", 4, "qv", steps=3), FAST,
                                  return_model=True)
    layers = dict(lora_layers(model))
    assert len(layers) == 2 * 6 and all(isinstance(m, LoRALinear) for m in layers.values())
    assert record["trainable"] == 6 * 2 * 4 * (384 + 384) + (384 * 2 + 2)  # A, B + the new head
    assert record["total"] > 22_000_000 and 0 <= record["score"] <= 1
    assert record["mode"] == "fast" and len(record["train_loss"]) == 3


@pytest.mark.slow
def test_run_one_on_the_real_lm():
    record = sweep.run_one(RunSpec("lm", "lora", 1, "q", steps=1), FAST)
    assert record["trainable"] == 30 * 1 * (576 + 576)
    assert record["score"] == record["exact"] and 0 <= record["token_accuracy"] <= 1
    assert math.isfinite(record["loss"]) and record["adapter_bytes"] == 4 * record["trainable"]


# ---------------------------------------------------------------- methods of the runs of record


def test_adapter_prefix_and_no_training_specs():
    a = RunSpec("lm", "adapter", size=8)
    assert a.key().endswith("size=8") and a.label() == "adapters (bottleneck 8)"
    assert a.resolved(FAST).lr == sweep.ADAPTER_LR["lm"]
    p = RunSpec("lm", "prefix", size=32, seed=1)
    assert p.label() == "prefix tuning (32 tokens)" and p.scaling is None
    none = RunSpec("lm", "none")
    assert none.resolved(FAST) == none  # nothing to train: no lr, no steps
    assert none.label() == "no training (zero-shot)"


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="lm", method="adapter"), "int size"),
    (dict(model="lm", method="prefix", size=0), "int size"),
    (dict(model="encoder", method="prefix", size=8), "causal LM only"),
    (dict(model="encoder", method="none"), "causal LM only"),
    (dict(model="lm", method="full", size=8), "has no size"),
    (dict(model="lm", method="lora", r=8, targets="qv", size=8), "has no size"),
    (dict(model="lm", method="adapter", size=8, r=2), "has no r"),
    (dict(model="lm", method="full", split="test"), "split must be"),
])
def test_bad_specs_of_the_new_methods(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunSpec(**kwargs)


def test_old_keys_are_unchanged_by_the_new_fields():
    """Stored sweeps resume by key: size and split appear only when set."""
    spec = RunSpec("lm", "lora", 8, "qv", seed=1, steps=40)
    assert spec.key() == "lm|lora|r=8|targets=qv|scaling=lora|base=float|seed=1|steps=40"
    assert RunSpec("lm", "full", split="val").key() == "lm|full|base=float|seed=0|split=val"


def test_validation_split_never_uses_test_templates():
    from lorabook import tasks

    split = tasks.loan_intent_task(200, 100, seed=0, validation=True)
    test = tasks.loan_intent_task(10, 200, seed=0)["test"]
    ids = lambda exs: {e.template_id for e in exs}  # noqa: E731
    assert not ids(split["train"]) & ids(split["test"])  # val templates unseen in fit
    assert not (ids(split["train"]) | ids(split["test"])) & ids(test)  # and never the test's
    assert {int(t.split("/")[1]) % 4 for t in ids(split["test"])} == {2}


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_dense_q_w0_trains_bit_identically_to_the_4bit_path(tiny_runs, autocast):
    """The QLoRA quality runs of record hold Q(W0) dense: same loss and gradients, fp32, bit for
    bit; under bf16 autocast (the record setting's --mixed-precision) the 4-bit path trains too,
    to bf16 rounding of the dense path (its layers hand fp32 on where the dense ones hand bf16)."""
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 12))
    out = {}
    for dense in (None, True):
        spec = RunSpec("lm", "lora", 2, "all", "rslora", base="nf4", dense_base=dense).resolved(FAST)
        model, _ = sweep.load_base(spec)
        model = sweep.prepare_model(model, spec)
        with torch.no_grad():  # B != 0, so that the adapters change the function
            for i, (_, layer) in enumerate(lora_layers(model)):
                layer.B.copy_(0.05 * torch.randn(layer.B.shape, generator=torch.Generator().manual_seed(i)))
        with train_module.autocast(torch.device("cpu"), autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # the 4-bit path's backward once failed under autocast (bf16 @ fp32)
        out[dense] = (loss.detach(), {n: (m.A.grad, m.B.grad) for n, m in lora_layers(model)},
                      model)
    (loss4, grads4, m4), (lossd, gradsd, md) = out[None], out[True]
    assert all(isinstance(m.base_layer, LinearNF4) for _, m in lora_layers(m4))
    assert not any(isinstance(m, LinearNF4) for m in md.modules())  # no 4-bit layer left
    if autocast is None:
        assert torch.equal(loss4, lossd)
        for name, (gA, gB) in grads4.items():
            assert torch.equal(gA, gradsd[name][0]) and torch.equal(gB, gradsd[name][1]), name
        return
    torch.testing.assert_close(loss4, lossd, rtol=2e-2, atol=0)
    for name, (gA, gB) in grads4.items():
        for g4, gd in ((gA, gradsd[name][0]), (gB, gradsd[name][1])):
            assert g4.dtype == gd.dtype == torch.float32 and torch.isfinite(g4).all(), name
            assert torch.linalg.vector_norm(g4 - gd) <= 0.1 * torch.linalg.vector_norm(gd), name


def test_a_tiny_qlora_record_spec_runs(tiny_runs):
    spec = RunSpec("lm", "lora", 2, "attn", "rslora", base="fp4", dense_base=True, lr=1e-2, steps=2)
    record = sweep.run_one(spec, FAST)
    assert record["dense_base"] is True and record["base"] == "fp4"
    assert record["key"].endswith("dense_base=True") and "dense Q(W0)" in record["label"]
    assert math.isfinite(record["final_loss"]) and len(record["per_example"]) == 8
    with pytest.raises(ValueError, match="needs base"):
        RunSpec("lm", "lora", 2, "all", dense_base=True)
    with pytest.raises(ValueError, match="dense_base must be"):
        RunSpec("lm", "lora", 2, "all", base="nf4", dense_base=False)
