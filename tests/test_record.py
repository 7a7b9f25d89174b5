"""lorabook.record: the learning-rate choice, the grid's order, resuming, merging shards."""

import json

import pytest
import torch

from lorabook import record
from lorabook.config import get_settings
from lorabook.results import read_results
from lorabook.sweep import RunSpec

FAST = get_settings("fast")


def _val(method, lr, score, loss=1.0, model="lm"):
    return {"key": f"{model}|{method}|{lr}", "model": model, "method": method, "lr": lr,
            "split": "val", "score": score, "loss": loss}


def test_choose_lr_takes_the_best_validation_score_then_the_lower_loss():
    recs = [_val("lora", 1e-3, 0.5), _val("lora", 2e-3, 0.7, 0.4), _val("lora", 4e-3, 0.7, 0.3),
            _val("full", 5e-5, 0.9), {**_val("lora", 9.0, 1.0), "split": None}]  # a test run
    lr, keys = record.choose_lr(recs, "lm", "lora")
    assert lr == 4e-3  # tie on score: the lower validation loss
    assert len(keys) == 3
    with pytest.raises(ValueError, match="no validation runs"):
        record.choose_lr(recs, "lm", "prefix")


def test_lr_choices_say_when_the_chosen_rate_is_at_an_edge_of_its_candidates():
    # full: candidates 2e-5, 5e-5, 1e-4 (LR_CANDIDATES); the best is the highest
    # lora: 5e-4 .. 4e-3; the best inside; 4e-3 has no record (diverged)
    # prefix: the best is the lowest
    recs = [_val("full", 2e-5, 0.7), _val("full", 5e-5, 0.8), _val("full", 1e-4, 0.9),
            _val("lora", 5e-4, 0.6), _val("lora", 1e-3, 0.8), _val("lora", 2e-3, 0.7),
            _val("prefix", 3e-3, 0.5), _val("prefix", 1e-2, 0.4), _val("prefix", 3e-2, 0.1),
            {**_val("full", 9e-4, 1.0), "split": None}]  # a test run: not a candidate
    got = {c["method"]: c for c in record.lr_choices(recs, "lm")}
    assert set(got) == {"full", "lora", "prefix"}
    assert (got["full"]["chosen"], got["full"]["position"]) == (1e-4, "highest candidate")
    assert got["full"]["candidates"] == [2e-5, 5e-5, 1e-4] and got["full"]["missing"] == []
    assert "a higher rate might score better" in got["full"]["note"]
    assert (got["lora"]["chosen"], got["lora"]["position"]) == (1e-3, "inside")
    assert got["lora"]["missing"] == [4e-3] and "no record at 0.004" in got["lora"]["note"]
    assert got["prefix"]["position"] == "lowest candidate"
    assert "a lower rate might score better" in got["prefix"]["note"]
    assert record.lr_choices(recs, "encoder") == []


def _val_scored(method, lr, ones, n=200, skip=0):
    """A validation record right on ``ones`` of ``n`` messages, from message ``skip`` on."""
    return {**_val(method, lr, ones / n),
            "per_example": "0" * skip + "1" * ones + "0" * (n - ones - skip)}


def test_lr_choices_measure_the_rise_towards_an_edge_and_the_ties_with_the_choice():
    # full rises at every step to its highest candidate, each step far beyond the noise;
    # lora's highest wins by 2 messages of 200 over 5e-4 and 1e-3 (ties; 1e-3 wins on 8 messages
    # and loses on 10), 2e-3 dips
    recs = [_val_scored("full", 2e-5, 100), _val_scored("full", 5e-5, 140),
            _val_scored("full", 1e-4, 180),
            _val_scored("lora", 5e-4, 160), _val_scored("lora", 1e-3, 160, skip=10),
            _val_scored("lora", 2e-3, 100), _val_scored("lora", 4e-3, 162)]
    got = {c["method"]: c for c in record.lr_choices(recs, "lm")}
    full, lora = got["full"], got["lora"]
    assert full["rising"] and full["ties"] == [] and "rise (or hold) at every step" in full["note"]
    assert full["vs_chosen"][5e-5].mean == pytest.approx(-0.2)
    assert full["vs_chosen"][5e-5].high < 0  # 40 messages of 200 apart: not noise
    assert not lora["rising"] and "do not rise steadily" in lora["note"]
    assert lora["ties"] == [5e-4, 1e-3]
    d = lora["vs_chosen"][1e-3]
    assert d.mean == pytest.approx(-0.01) and d.low < 0 < d.high and d.examples == 200
    assert "within the validation noise" in lora["note"] and "0.001 (-0.010" in lora["note"]
    assert lora["scores"] == {5e-4: 0.8, 1e-3: 0.8, 2e-3: 0.5, 4e-3: 0.81}
    # the encoder's LoRA of record: the two higher rates collapse to chance, the lowest wins
    collapsed = [{**_val_scored("lora", lr, ones), "model": "encoder"}
                 for lr, ones in ((1e-3, 160), (3e-3, 100), (1e-2, 100))]
    (low,) = record.lr_choices(collapsed, "encoder")
    assert low["position"] == "lowest candidate" and low["rising"]
    assert "rise (or hold) at every step towards the edge" in low["note"]


def test_lr_specs_are_validation_runs_of_every_candidate():
    specs = record.lr_specs("lm")
    assert all(s.split == "val" and s.seed == 0 for s in specs)
    n = sum(len(v) for (m, _), v in record.LR_CANDIDATES.items() if m == "lm")
    assert len(specs) == n
    lora = [s for s in specs if s.method == "lora"]
    assert {s.r for s in lora} == {8} and {s.scaling for s in lora} == {"rslora"}


def test_grid_puts_seeds_0_to_2_first_and_covers_the_claims():
    lrs = {"full": 5e-5, "lora": 2e-3, "adapter": 1e-3, "prefix": 1e-2}
    specs = record.grid_specs("lm", lrs)
    seeds = [s.seed for s in specs]
    first_late = seeds.index(3)
    assert set(seeds[:first_late]) == {0, 1, 2} and set(seeds[first_late:]) == {3, 4}
    keys = {(s.method, s.targets, s.r, s.scaling, s.size) for s in specs}
    for r in record.RANKS:
        assert ("lora", "all", r, "rslora", None) in keys
    assert ("lora", "qv", 4, "rslora", None) in keys  # Table 5's fixed budget
    assert ("none", None, None, None, None) in keys
    assert sum(s.method == "none" for s in specs) == 1  # no training: one run, not one per seed
    assert len({s.key() for s in specs}) == len(specs)
    enc = record.grid_specs("encoder", {"full": 2e-4, "lora": 3e-3})
    assert {s.targets for s in enc if s.method == "lora"} == {"q", "qv", "all"}


def _fake_run_one(calls):
    def run_one(spec, settings, return_model=False, **kw):
        spec = spec.resolved(settings)
        calls.append(spec.key())
        score = {2e-5: 0.2, 5e-5: 0.6, 1e-4: 0.4}.get(spec.lr, 0.5) if spec.split else 0.7
        rec = {"key": spec.key(), **{k: getattr(spec, k) for k in ("model", "method", "lr",
                                                                    "split", "seed")},
               "score": score, "loss": 1.0}
        model = torch.nn.Linear(2, 2)
        return (rec, model) if return_model else rec
    return run_one


def test_run_record_chooses_lrs_then_runs_the_grid_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(record, "run_one", _fake_run_one(calls))
    monkeypatch.setattr(record, "LR_CANDIDATES", {("lm", "full"): (2e-5, 5e-5, 1e-4)})
    out = tmp_path / "lm_record.jsonl"
    recs = record.run_record("lm", out, workers=1, settings=FAST, mixed_precision=False)
    val = [r for r in recs if r["split"] == "val"]
    grid = [r for r in recs if r["split"] is None]
    assert len(val) == 3
    assert {r["lr"] for r in grid if r["method"] == "full"} == {5e-5}  # the best val score
    assert {r["method"] for r in grid} == {"full", "none"}  # methods without an lr wait
    assert not list(tmp_path.glob("*.shard*"))  # merged, shards removed
    n = len(calls)
    again = record.run_record("lm", out, workers=1, settings=FAST, mixed_precision=False)
    assert len(calls) == n and len(again) == len(recs)  # nothing re-run


def test_a_grid_continued_elsewhere_keeps_its_lrs_and_skips_its_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(record, "run_one", _fake_run_one(calls))
    monkeypatch.setattr(record, "LR_CANDIDATES", {("lm", "full"): (2e-5, 5e-5, 1e-4)})
    first = tmp_path / "lm_record_gpu.jsonl"
    record.run_record("lm", first, settings=FAST, mixed_precision=False, max_runs=2)  # seed 0 only
    n = len(calls)
    out = tmp_path / "lm_record.jsonl"
    recs = record.run_record("lm", out, settings=FAST, mixed_precision=False, lr_from=first,
                             only=["lm|full|*"])
    assert calls[n:] == [r["key"] for r in recs]
    assert {r["seed"] for r in recs} == {1, 2, 3, 4}  # seed 0's run is in the first file
    assert {r["method"] for r in recs} == {"full"} and {r["lr"] for r in recs} == {5e-5}
    assert not any(r.get("split") == "val" for r in recs)  # stage 1 is the first file's
    with pytest.raises(ValueError, match="no run of the grid matches"):
        record.run_record("lm", out, settings=FAST, lr_from=first, only=["lm|nothing|*"])
    with pytest.raises(ValueError, match="not in this one"):
        record.run_record("lm", tmp_path / "x.jsonl", settings=get_settings("cpu"), lr_from=first)
    with pytest.raises(FileNotFoundError):
        record.run_record("lm", out, settings=FAST, lr_from=tmp_path / "absent.jsonl")


def test_deadline_stops_claiming_and_max_runs_cuts_each_stage(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(record, "run_one", _fake_run_one(calls))
    out = tmp_path / "lm.jsonl"
    record.run_record("lm", out, budget_s=-1, settings=FAST, mixed_precision=False)
    assert calls == []
    record.run_record("lm", out, settings=FAST, mixed_precision=False, max_runs=2)
    assert len(calls) == 2 + 2


def test_a_run_that_raises_is_reported_and_the_command_exits_1(tmp_path, monkeypatch, capsys):
    """The other runs go on and are stored, but the command must not look done: a run of the
    QLoRA grid once failed in backward and the loop that ran it saw exit status 0."""
    calls = []
    fake = _fake_run_one(calls)

    def run_one(spec, settings, return_model=False, **kw):
        if spec.method == "full" and spec.lr == 5e-5:
            raise RuntimeError("expected m1 and m2 to have the same dtype")
        return fake(spec, settings, return_model, **kw)

    monkeypatch.setattr(record, "run_one", run_one)
    monkeypatch.setattr(record, "LR_CANDIDATES", {("lm", "full"): (2e-5, 5e-5, 1e-4)})
    out = tmp_path / "lm.jsonl"
    with pytest.raises(record.RunsFailed, match="1 run"):
        record.run_record("lm", out, settings=FAST, mixed_precision=False, stages=("lr",))
    assert {r["lr"] for r in read_results(out)[1]} == {2e-5, 1e-4}  # the others were stored
    assert "FAILED" in capsys.readouterr().out
    monkeypatch.setenv("LORABOOK_RECORD_ANY_MODE", "1")
    with pytest.raises(SystemExit) as exit_:
        record.main(["--model", "lm", "--stages", "lr", "--out", str(out)])
    assert exit_.value.code == 1 and "FAILED: 1 run(s) raised" in capsys.readouterr().err


def test_done_keys_skip_a_shards_kept_factors(tmp_path):
    """A run that keeps its A, B leaves ``x.jsonl.shard0.factors.pt`` beside its shard; a resumed
    command must not read it as a results file (it did once, and stopped every later run)."""
    from lorabook.results import append_record, open_results

    out = tmp_path / "x.jsonl"
    shard = tmp_path / "x.jsonl.shard0"
    open_results(shard, FAST)
    append_record(shard, {"key": "a", "split": None})
    torch.save({"a": {}}, tmp_path / "x.jsonl.shard0.factors.pt")
    assert record._done_keys(out) == {"a"}


def test_merge_shards_appends_each_record_once_and_keeps_factors(tmp_path):
    from lorabook.results import append_record, open_results

    out = tmp_path / "x.jsonl"
    for i, keys in enumerate((["a", "b"], ["b", "c"])):
        shard = tmp_path / f"x.jsonl.shard{i}"
        open_results(shard, FAST)
        for k in keys:
            append_record(shard, {"key": k})
        torch.save({f"f{i}": {"A": torch.ones(1)}}, tmp_path / f"x.jsonl.shard{i}.factors.pt")
    assert record.merge_shards(out, FAST) == 3
    assert [r["key"] for r in read_results(out)[1]] == ["a", "b", "c"]
    assert set(torch.load(tmp_path / "x.factors.pt")) == {"f0", "f1"}
    assert not list(tmp_path.glob("*shard*"))


def test_keeps_factors_only_for_the_subspace_runs():
    assert record.keeps_factors(RunSpec("lm", "lora", 64, "qv", "rslora", seed=1))
    assert not record.keeps_factors(RunSpec("lm", "lora", 64, "qv", "rslora", seed=2))
    assert not record.keeps_factors(RunSpec("lm", "lora", 2, "all", "rslora", seed=0))
    assert not record.keeps_factors(RunSpec("lm", "full", seed=0))


def test_the_command_refuses_a_setting_other_than_record(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABOOK_MODE", "fast")
    monkeypatch.delenv("LORABOOK_RECORD_ANY_MODE", raising=False)
    with pytest.raises(SystemExit):
        record.main(["--model", "lm", "--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()
    json.dumps({})  # (json imported for the fake records' sake)


def test_qlora_grid_covers_every_base_rank_and_attention_only_seeds_first():
    specs = record.qlora_grid_specs(2e-3)
    assert len({s.key() for s in specs}) == len(specs)
    seeds = [s.seed for s in specs]
    assert set(seeds[:seeds.index(3)]) == {0, 1, 2}
    for seed in range(5):
        of_seed = {(s.base, s.r, s.targets, s.dense_base) for s in specs if s.seed == seed}
        for base in record.QLORA_BASES:
            dense = None if base == "float" else True
            assert all((base, r, "all", dense) in of_seed for r in record.QLORA_RANKS)
        assert ("nf4", 8, "attn", True) in of_seed and ("float", 8, "attn", None) in of_seed
    true_4bit = [s for s in specs if s.base != "float" and s.dense_base is None]
    assert {(s.base, s.r, s.seed) for s in true_4bit} == {(b, 8, 0) for b in ("nf4", "fp4", "int4")}
    assert {s.lr for s in specs} == {2e-3} and {s.scaling for s in specs} == {"rslora"}


def test_run_record_qlora_grid_chooses_loras_lr_first(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(record, "run_one", _fake_run_one(calls))
    out = tmp_path / "qlora_record.jsonl"
    recs = record.run_record("lm", out, settings=FAST, mixed_precision=False, grid="qlora",
                             max_runs=3)
    val = [r for r in recs if r["split"] == "val"]
    assert len(val) == 3 and {r["method"] for r in val} == {"lora"}  # LoRA's candidates only
    grid = [r for r in recs if r["split"] is None]
    assert len(grid) == 3 and {r["lr"] for r in grid} == {record.LR_CANDIDATES[("lm", "lora")][0]}
    with pytest.raises(ValueError, match="the LM's"):
        record.run_record("encoder", out, settings=FAST, grid="qlora")


def test_the_qlora_grid_continued_from_the_main_grid_takes_its_lora_rate(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(record, "run_one", _fake_run_one(calls))
    monkeypatch.setattr(record, "LR_CANDIDATES", {("lm", "lora"): (1e-3, 4e-3)})
    main = tmp_path / "lm_record_gpu.jsonl"
    record.run_record("lm", main, settings=FAST, mixed_precision=False, stages=["lr"])
    lr = record.choose_lr(read_results(main)[1], "lm", "lora")[0]
    n = len(calls)
    out = tmp_path / "qlora_record.jsonl"
    recs = record.run_record("lm", out, settings=FAST, mixed_precision=False, grid="qlora",
                             lr_from=main, only=["lm|lora|r=8|targets=all|*|base=nf4|seed=[01]|*|dense_base=True"])
    assert calls[n:] == [r["key"] for r in recs]  # no stage 1 of its own: the main grid's
    assert [r["key"] for r in recs] == [
        f"lm|lora|r=8|targets=all|scaling=rslora|base=nf4|seed={seed}|alpha=16.0|lr={lr}|"
        f"steps={FAST.train_steps}|dense_base=True" for seed in (0, 1)]
    without_lora = tmp_path / "full_only.jsonl"
    monkeypatch.setattr(record, "LR_CANDIDATES", {("lm", "full"): (1e-4,)})
    record.run_record("lm", without_lora, settings=FAST, mixed_precision=False, stages=["lr"])
    with pytest.raises(ValueError, match="no LoRA runs on the validation split"):
        record.run_record("lm", out, settings=FAST, grid="qlora", lr_from=without_lora)


def test_the_command_runs_the_qlora_grid(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(record, "run_record", lambda *a: seen.setdefault("args", a) and [])
    monkeypatch.setenv("LORABOOK_RECORD_ANY_MODE", "1")
    record.main(["--model", "lm", "--grid", "qlora", "--out", str(tmp_path / "q.jsonl")])
    assert seen["args"][8] == "qlora" and seen["args"][9:] == (None, [])


def test_the_command_continues_a_grid_with_only_patterns(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(record, "run_record", lambda *a: seen.setdefault("args", a) and [])
    monkeypatch.setenv("LORABOOK_RECORD_ANY_MODE", "1")
    record.main(["--model", "lm", "--lr-from", "a.jsonl", "--only", "lm|full|*", "--only",
                 "lm|lora|*", "--out", str(tmp_path / "b.jsonl")])
    assert seen["args"][9:] == (record.Path("a.jsonl"), ["lm|full|*", "lm|lora|*"])
