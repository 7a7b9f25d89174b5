"""lorabook.results: the JSON Lines results file (header, append, checks) and summarize's maths."""

from __future__ import annotations

import json
import math

import pytest

from lorabook import config, results

FAST, CPU = config.get_settings("fast"), config.get_settings("cpu")


def _record(key: str, score: float, **fields) -> dict:
    base = {"model": "encoder", "method": "lora", "r": 8, "targets": "qv", "scaling": "lora",
            "base": "float", "alpha": 16.0, "lr": 1e-3, "steps": 8, "seed": 0}
    return {"key": key, **base, **fields, "score": score}


def test_new_file_gets_a_header_and_records_append_in_order(tmp_path):
    path = tmp_path / "sub" / "runs.jsonl"
    header, records = results.open_results(path, FAST)
    assert records == [] and header["format"] == results.FORMAT
    assert header["version"] == results.VERSION and header["settings"]["mode"] == "fast"
    results.append_record(path, _record("a", 0.5))
    results.append_record(path, _record("b", 0.75))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0]) == header  # header stays the first line
    assert [r["key"] for r in results.load_results(path)] == ["a", "b"]
    header2, records2 = results.open_results(path, FAST)  # reopening appends nothing
    assert header2 == header and len(records2) == 2 and len(path.read_text().splitlines()) == 3


def test_an_empty_file_is_treated_as_new(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.touch()
    results.open_results(path, FAST)
    assert json.loads(path.read_text())["format"] == results.FORMAT


def test_a_file_that_is_not_ours_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match=r"notes\.jsonl, line 1: not a lorabook-sweep"):
        results.open_results(path, FAST)
    path.write_text("just some text\n")
    with pytest.raises(ValueError, match="line 1: not a lorabook-sweep"):
        results.load_results(path)
    assert path.read_text() == "just some text\n"  # never overwritten


def test_a_corrupt_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    results.open_results(path, FAST)
    results.append_record(path, _record("a", 0.5))
    with open(path, "a") as f:
        f.write('{"key": "b", "score": 0.')  # a write cut short
    before = path.read_text()
    with pytest.raises(ValueError, match=r"runs\.jsonl, line 3: corrupt record"):
        results.open_results(path, FAST)
    assert path.read_text() == before


def test_records_without_key_duplicates_and_other_versions_are_errors(tmp_path):
    path = tmp_path / "runs.jsonl"
    header = results.make_header(FAST)
    path.write_text(json.dumps(header) + "\n" + json.dumps({"score": 1}) + "\n")
    with pytest.raises(ValueError, match="line 2: a record must be a JSON object with a string 'key'"):
        results.load_results(path)
    path.write_text("\n".join(json.dumps(x) for x in (header, _record("a", 1), _record("a", 1))))
    with pytest.raises(ValueError, match="line 3: key 'a' already on line 2"):
        results.load_results(path)
    path.write_text(json.dumps({**header, "version": 99}) + "\n")
    with pytest.raises(ValueError, match="version 99"):
        results.load_results(path)


def test_runs_of_another_setting_are_not_mixed_in(tmp_path):
    path = tmp_path / "runs.jsonl"
    results.open_results(path, FAST)
    with pytest.raises(ValueError, match="'fast' settings .* not with the 'cpu' settings"):
        results.open_results(path, CPU)


def test_settings_changes_names_each_field_that_differs(tmp_path):
    header, _ = results.open_results(tmp_path / "runs.jsonl", FAST)
    assert results.settings_changes(header, FAST) == {}
    changed = results.settings_changes(header, CPU)
    assert changed["mode"] == ("fast", "cpu")
    assert changed["train_steps"] == (FAST.train_steps, CPU.train_steps)
    assert set(changed) == {k for k in vars(FAST) if getattr(FAST, k) != getattr(CPU, k)}
    assert results.settings_changes({}, FAST)["mode"] == (None, "fast")  # a header without settings


def test_append_record_needs_a_key(tmp_path):
    with pytest.raises(ValueError, match="key"):
        results.append_record(tmp_path / "x.jsonl", {"score": 1.0})


def test_summarize_mean_std_and_n_over_seeds():
    records = [_record("a0", 0.5, seed=0), _record("a1", 0.7, seed=1), _record("a2", 0.9, seed=2),
               _record("b0", 0.6, r=2, seed=0),
               _record("f0", 0.8, method="full", r=None, targets=None, scaling=None, alpha=None)]
    table = results.summarize(records)
    assert len(table) == 3
    a = table.xs(8, level="r").iloc[0]
    assert a["score_mean"] == pytest.approx(0.7)
    assert a["score_std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9 (ddof = 1)
    assert a["n"] == 3
    b = table.xs(2, level="r").iloc[0]
    assert b["n"] == 1 and math.isnan(b["score_std"])
    full = table[table.index.get_level_values("method") == "full"].iloc[0]  # None keys kept
    assert full["score_mean"] == pytest.approx(0.8) and full["n"] == 1


def test_summarize_by_chosen_fields_and_metrics():
    records = [_record("a", 0.5, step_s=1.0), _record("b", 1.0, r=2, step_s=3.0)]
    table = results.summarize(records, by=("targets",), metrics=("score", "step_s"))
    row = table.loc["qv"]
    assert row["score_mean"] == pytest.approx(0.75) and row["step_s_mean"] == pytest.approx(2.0)
    assert row["score_std"] == pytest.approx(math.sqrt(0.125)) and row["n"] == 2
    with pytest.raises(ValueError, match="lack the fields"):
        results.summarize(records, by=("nonsense",))
    with pytest.raises(ValueError, match="at least one"):
        results.summarize([])


def test_gaps_to_full_closed_form():
    records = [_record("f0", 0.8, method="full", r=None, targets=None, scaling=None, alpha=None),
               _record("f1", 0.8, method="full", r=None, targets=None, scaling=None, alpha=None,
                       seed=1),
               _record("a0", 0.6, r=1), _record("a1", 0.8, r=1, seed=1),
               _record("b0", 0.78, r=8)]
    table = results.gaps_to_full(records, n_test=100)
    r1 = table.xs(1, level="r").iloc[0]
    assert r1["gap"] == pytest.approx(-0.1) and r1["full_mean"] == pytest.approx(0.8)
    se2_lora = 0.02 / 2 + 0.7 * 0.3 / 100  # seed variance / n + binomial p(1-p)/n_test
    se2_full = 0.0 + 0.8 * 0.2 / 100  # two identical seeds: no spread
    assert r1["noise"] == pytest.approx(2 * math.sqrt(se2_lora + se2_full))
    assert r1["verdict"] == "within noise"  # 0.1 < 0.21
    r8 = table.xs(8, level="r").iloc[0]
    assert r8["noise"] == pytest.approx(2 * math.sqrt(0.78 * 0.22 / 100 + se2_full))
    assert r8["verdict"] == "within noise"
    big = results.gaps_to_full(records, n_test=100_000)
    assert big.xs(1, level="r").iloc[0]["verdict"] == "within noise"  # seed spread: 2 se = 0.2
    assert big.xs(8, level="r").iloc[0]["verdict"] == "below full"  # 0.02 > 2 se ~ 0.006
    with pytest.raises(ValueError, match="needs full fine-tuning runs"):
        results.gaps_to_full(records[2:], n_test=100)
    with pytest.raises(ValueError, match="n_test"):
        results.gaps_to_full(records, n_test=0)


def test_difference_noise_adds_seed_spread_and_test_sampling():
    one = results.difference_noise((0.5, float("nan"), 1), (0.5, float("nan"), 1), n_test=100)
    assert one == pytest.approx(2 * math.sqrt(2 * 0.25 / 100))  # binomial terms only
    two = results.difference_noise((0.5, 0.2, 4), (0.9, 0.0, 2), n_test=100)
    assert two == pytest.approx(2 * math.sqrt(0.04 / 4 + 0.25 / 100 + 0.09 / 100))
