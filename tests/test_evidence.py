"""lorabook.evidence: bootstrap intervals, paired differences and verdicts on data with known answers."""

import json
from pathlib import Path

import numpy as np
import pytest

from lorabook import evidence
from lorabook.evidence import Estimate, difference, estimate, verdict
from lorabook.results import append_record, open_results

ROOT = Path(__file__).resolve().parents[1]


def test_estimate_of_a_constant_matrix_has_no_width():
    est = estimate(np.ones((3, 50)))
    assert (est.mean, est.low, est.high, est.seeds, est.examples) == (1.0, 1.0, 1.0, 3, 50)


def test_one_seed_gives_the_binomial_interval():
    M = (np.random.default_rng(1).random((1, 2000)) < 0.7).astype(float)
    est = estimate(M)
    assert est.low < 0.7 < est.high
    se = np.sqrt(0.7 * 0.3 / M.size)
    assert est.high - est.low == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_resampling_seeds_and_examples_is_conservative():
    """With no seed effect at all the crossed bootstrap counts the noise twice: wider, never narrower."""
    M = (np.random.default_rng(1).random((3, 2000)) < 0.7).astype(float)
    est = estimate(M)
    binomial = 2 * 1.96 * np.sqrt(0.7 * 0.3 / M.size)
    assert est.low < 0.7 < est.high
    assert binomial < est.high - est.low < 2.2 * binomial


def test_seed_spread_widens_the_interval():
    rng = np.random.default_rng(2)
    same = np.tile((rng.random(400) < 0.5).astype(float), (3, 1))
    shifted = same.copy()
    shifted[0, :120] = 1  # one seed much better than the others
    shifted[1, :120] = 0
    assert estimate(shifted).high - estimate(shifted).low > estimate(same).high - estimate(same).low


def test_a_paired_difference_of_identical_runs_is_exactly_zero():
    M = (np.random.default_rng(3).random((1, 300)) < 0.6).astype(float)
    d = difference(M, M)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)


def test_pairing_on_examples_narrows_the_difference():
    rng = np.random.default_rng(4)
    B = (rng.random((1, 500)) < 0.6).astype(float)
    A = B.copy()
    A[0, np.flatnonzero(B[0] == 0)[:25]] = 1  # A = B plus 25 more right: +0.05 exactly
    d = difference(A, B)
    assert d.mean == pytest.approx(0.05)
    unpaired = np.sqrt(2 * 0.6 * 0.4 / 500) * 2 * 1.96  # width if the examples were independent
    assert d.high - d.low < unpaired / 2
    assert d.low > 0


def test_difference_needs_the_same_examples():
    with pytest.raises(ValueError, match="same examples"):
        difference(np.ones((1, 3)), np.ones((1, 4)))


@pytest.mark.parametrize("low, high, seeds, word", [
    (-0.02, 0.02, 3, "reaches"), (0.01, 0.10, 5, "above"), (-0.2, -0.05, 3, "below"),
    (-0.05, 0.04, 3, "undecided"), (-0.01, 0.01, 1, "provisional: reaches"),
    (-0.03, -0.001, 3, "reaches"),  # within the margin wins over "below"
])
def test_verdict_rules(low, high, seeds, word):
    assert verdict(Estimate((low + high) / 2, low, high, seeds, 100)) == word


def test_claims_with_the_above_rule():
    claim = evidence.Claim("x", "4", {}, {}, rule="above")
    assert claim.decide(Estimate(0.1, 0.05, 0.15, 3, 10)) == "holds"
    assert claim.decide(Estimate(0.0, -0.01, 0.01, 3, 10)) == "does not hold (within the margin)"
    assert claim.decide(Estimate(0.1, 0.05, 0.15, 1, 10)) == "provisional: holds"


def test_constant_reply_takes_each_fields_most_common_value():
    recs = [{"intent": "a", "amount": None}, {"intent": "b", "amount": None},
            {"intent": "a", "amount": "5.00"}]
    assert evidence.constant_reply(recs) == {"intent": "a", "amount": None}


def test_constant_baseline_scores_the_reply_it_names():
    base = evidence.constant_baseline(200, 100)
    assert len(base["per_example"]) == 100
    assert base["exact"] == pytest.approx(base["per_example"].count("1") / 100)
    assert 0 <= base["exact"] <= base["intent_accuracy"] <= 1


def _file(tmp_path, runs, prefix="k"):
    from lorabook.config import get_settings

    path = tmp_path / "lm_record.jsonl"
    open_results(path, get_settings("fast"))
    for i, (fields, bits) in enumerate(runs):
        append_record(path, {"key": f"{prefix}{i}", "split": None, "per_example": bits, **fields})
    return path


def test_ledger_rows_from_a_file(tmp_path):
    full = {"method": "full", "seed": 0}
    lora = {"method": "lora", "r": 8, "targets": "all", "scaling": "rslora", "seed": 0}
    path = _file(tmp_path, [(full, "1111011110"), (lora, "1111011100")])
    claims = {"lm": (evidence.LM_CLAIMS[2], evidence.LM_CLAIMS[3])}  # r = 8 (present), r = 1 (not)
    table = evidence.ledger({"lm": path}, claims)
    row = table.iloc[0]
    assert (row["A"], row["B"], row["difference"]) == (0.7, 0.8, pytest.approx(-0.1))
    assert row["verdict"].startswith("provisional: ")
    assert table.iloc[1]["verdict"] == "no records yet (A)"
    assert evidence.record_path("lm", tmp_path) == path


def test_a_grid_in_two_files_is_read_as_one(tmp_path):
    """A grid begun on a GPU and continued on a CPU (record --lr-from): both files, GPU first."""
    full = {"method": "full"}
    lora = {"method": "lora", "r": 8, "targets": "all", "scaling": "rslora"}
    gpu = _file(tmp_path, [({**full, "seed": 0}, "1111011110"), ({**lora, "seed": 0}, "1111011100")])
    gpu = gpu.rename(tmp_path / "lm_record_gpu.jsonl")
    cpu = _file(tmp_path, [({**full, "seed": 1, "key": "f1"}, "1111111110"),
                           ({**lora, "seed": 1, "key": "l1"}, "1111000000")])
    assert evidence.record_paths("lm", tmp_path) == [gpu, cpu]
    assert evidence.record_path("lm", tmp_path) == gpu
    _, runs = evidence.test_runs([gpu, cpu])
    assert len([r for r in runs if r["method"] != "constant"]) == 4
    row = evidence.ledger({"lm": [gpu, cpu]}, {"lm": (evidence.LM_CLAIMS[2],)}).iloc[0]
    assert (row["A"], row["B"], row["seeds"]) == (0.55, 0.85, 2)
    assert row["file"] == "lm_record_gpu.jsonl + lm_record.jsonl"
    # the same key in both files counts once (the GPU file's); another setting is refused
    _, twice = evidence.test_runs([gpu, gpu])
    assert len(twice) == len(evidence.test_runs(gpu)[1])
    from lorabook.config import get_settings

    other = tmp_path / "other" / "lm_record.jsonl"
    open_results(other, get_settings("cpu"))
    append_record(other, {"key": "x", "split": None, "per_example": "1", "method": "full"})
    with pytest.raises(ValueError, match="not one grid"):
        evidence.test_runs([gpu, other])


def test_a_configuration_run_at_two_learning_rates_is_refused(tmp_path):
    key = "lm|lora|r=8|targets=all|scaling=rslora|base=float|seed={}|alpha=16.0|lr={}|steps=300"
    lora = {"model": "lm", "method": "lora", "r": 8, "targets": "all", "scaling": "rslora"}
    same = _file(tmp_path, [({**lora, "seed": s, "lr": 4e-3, "key": key.format(s, 0.004)}, "1100")
                            for s in (0, 1)])
    assert len(evidence.test_runs(same)[1]) == 3  # two seeds of one rate, and the constant reply
    (tmp_path / "mixed").mkdir()
    mixed = _file(tmp_path / "mixed",
                  [({**lora, "seed": 0, "lr": 4e-3, "key": key.format(0, 0.004)}, "1100"),
                   ({**lora, "seed": 1, "lr": 8e-3, "key": key.format(1, 0.008)}, "1110")])
    with pytest.raises(ValueError, match="more than one learning rate"):
        evidence.test_runs(mixed)


def test_the_ledger_recomputes_from_the_stored_records():
    """Two of the ledger's numbers, recomputed from the committed file with plain json."""
    paths = evidence.record_paths("lm", ROOT / "benchmarks" / "results")
    if not paths:
        pytest.skip("no LM records committed")
    lines = [json.loads(x) for path in paths for x in path.read_text().splitlines()[1:]]
    test = list({r["key"]: r for r in reversed(lines) if r.get("split") is None}.values())

    def mean_of(**f):
        bits = "".join(r["per_example"] for r in test if all(r.get(k) == v for k, v in f.items()))
        return bits.count("1") / len(bits)

    table = evidence.ledger({"lm": paths}, {"lm": (evidence.LM_CLAIMS[0], evidence.LM_CLAIMS[2])})
    zero_shot, lora = table.iloc[0], table.iloc[1]
    assert zero_shot["B"] == pytest.approx(mean_of(method="none"))
    assert lora["A"] == pytest.approx(mean_of(method="lora", r=8, targets="all", scaling="rslora"))
    assert lora["B"] == pytest.approx(mean_of(method="full"))


def test_qlora_rows_per_format_say_no_record_yet_without_the_file(tmp_path):
    table = evidence.ledger({"qlora": None}, {"qlora": evidence.QLORA_CLAIMS}, learned=False)
    assert len(table) == len(evidence.QLORA_CLAIMS)
    for name in evidence.FORMAT_NAMES.values():  # one "matches 16-bit LoRA" row per format
        assert table["claim"].str.contains(f"QLoRA, base in {name} (", regex=False).sum() == 1
        for r in (2, 64):  # and one at each end of the rank series
            assert (table["claim"] == f"QLoRA, base in {name}, matches 16-bit LoRA at r = {r}").sum() == 1
    assert set(table["verdict"]) == {"no records yet (A and B)"}
    assert evidence.record_path("qlora", tmp_path) is None


def test_qlora_rows_compare_the_dense_quality_runs_with_float_lora(tmp_path):
    lora = {"method": "lora", "r": 8, "targets": "all", "scaling": "rslora"}
    runs = []
    for seed in (0, 1, 2):
        runs.append(({**lora, "base": "float", "dense_base": None, "seed": seed}, "1111011110"))
        runs.append(({**lora, "base": "nf4", "dense_base": True, "seed": seed}, "1111011100"))
    runs.append(({**lora, "base": "nf4", "dense_base": None, "seed": 0}, "0000000000"))  # 4-bit path
    path = _file(tmp_path, runs).rename(tmp_path / "qlora_record.jsonl")
    assert evidence.record_path("qlora", tmp_path) == path
    table = evidence.ledger({"qlora": path}, {"qlora": evidence.QLORA_CLAIMS[:2]}, learned=False)
    nf4, fp4 = table.iloc[0], table.iloc[1]
    assert (nf4["A"], nf4["B"], nf4["seeds"]) == (0.7, 0.8, 3)  # the timing run is not a quality run
    assert not nf4["verdict"].startswith("provisional") and nf4["verdict"] != "reaches"
    assert fp4["verdict"] == "no records yet (A)"


def test_attention_only_rows_separate_the_placement_from_the_4bit_base(tmp_path):
    lora = {"method": "lora", "r": 8, "scaling": "rslora"}
    runs = []
    for seed in (0, 1, 2):
        runs.append(({**lora, "targets": "all", "base": "float", "seed": seed}, "1111111110"))
        runs.append(({**lora, "targets": "attn", "base": "float", "seed": seed}, "1111011100"))
        runs.append(({**lora, "targets": "attn", "base": "nf4", "dense_base": True, "seed": seed},
                     "1111011100"))
    path = _file(tmp_path, runs).rename(tmp_path / "qlora_record.jsonl")
    claims = [c for c in evidence.QLORA_CLAIMS if c.a.get("targets") == "attn" or c.b.get("targets") == "attn"]
    table = evidence.ledger({"qlora": path}, {"qlora": claims}, learned=False)
    placement_4bit, placement_16bit, base = table.iloc[0], table.iloc[1], table.iloc[2]
    assert placement_4bit["verdict"] == "no records yet (A)"  # NF4 on all linear layers: none here
    assert (placement_16bit["A"], placement_16bit["B"]) == (0.9, 0.7)
    assert base["A"] == base["B"] == 0.7 and base["difference"] == 0


def test_qlora_rows_read_their_float_reference_from_the_main_grid(tmp_path, monkeypatch):
    """A QLoRA grid continued from the main one (record --grid qlora --lr-from): its 4-bit runs in
    qlora_record.jsonl, the float-base LoRA runs (the same keys) in the main grid's file."""
    lora = {"method": "lora", "r": 8, "targets": "all", "scaling": "rslora", "lr": 4e-3}
    main = _file(tmp_path, [({**lora, "base": "float", "seed": s}, "1111011110") for s in (0, 1, 2)])
    (tmp_path / "q").mkdir()
    qlora = _file(tmp_path / "q", [({**lora, "base": "nf4", "dense_base": True, "seed": s},
                                    "1111011100") for s in (0, 1, 2)], prefix="q")
    qlora = qlora.rename(tmp_path / "qlora_record.jsonl")
    monkeypatch.setenv("LORABOOK_RESULTS", str(tmp_path))
    table = evidence.ledger(claims={"qlora": evidence.QLORA_CLAIMS[:1]}, learned=False)
    row = table.iloc[0]
    assert (row["A"], row["B"], row["seeds"]) == (0.7, 0.8, 3)
    assert row["file"] == f"{qlora.name} + {main.name}"
    qlora.unlink()  # without a QLoRA file: the 4-bit runs are missing, not the float ones
    table = evidence.ledger(claims={"qlora": evidence.QLORA_CLAIMS[:1]}, learned=False)
    assert table.iloc[0]["verdict"] == "no records yet (A)"


def test_a_loss_spike_is_a_rise_above_the_first_loss_after_learning():
    def spike(losses):
        return evidence.loss_spike({"train_loss": losses}, window=1)  # the rule on raw steps

    assert spike([2.0, 0.5, 0.1, 0.15, 3.0, 1.0]) == 5
    assert spike([2.0, 2.5, 0.1]) is None  # above it before learning
    assert spike([2.0, 0.3, 1.9, 0.2]) is None  # never below 0.2
    assert spike([2.0, 0.1, 1.5, 0.01]) is None  # noisy, not above
    assert evidence.loss_spike({"train_loss": []}) is None
    assert evidence.loss_spike({}) is None


def test_a_loss_spike_reads_the_running_mean_so_one_batch_decides_nothing():
    assert list(evidence.running_mean([1.0, 3.0, 5.0, 7.0], window=2)) == [1.0, 2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="positive"):
        evidence.running_mean([1.0], window=0)
    # a classifier's batch loss: one lucky batch below a tenth, one unlucky one above the first
    noisy = [0.69] + [0.3] * 20 + [0.05] + [0.3] * 20 + [0.9] + [0.3] * 20
    assert evidence.loss_spike({"train_loss": noisy}, window=1) == 43  # the raw rule is fooled
    assert evidence.loss_spike({"train_loss": noisy}) is None  # never learned, on the mean
    lost = [2.0] + [0.05] * 20 + [4.0] * 10  # learned, then stayed far above where it began
    # the 10-step mean falls below 0.2 at index 10 and passes 2.0 once 5 of its steps are 4.0
    assert evidence.loss_spike({"train_loss": lost}) == 26


def test_a_spiked_run_stays_in_the_verdict_and_the_row_says_what_it_changes(tmp_path):
    full = {"method": "full"}
    lora = {"method": "lora", "r": 64, "targets": "all", "scaling": "rslora"}
    calm, spiked = [2.0] + [0.05] * 30, [2.0] + [0.05] * 20 + [4.0] * 10
    runs = [({**full, "seed": s, "train_loss": calm}, "1111111100" * 3) for s in (0, 1, 2)]
    runs += [({**lora, "seed": s, "train_loss": calm}, "1111111100" * 3) for s in (0, 1)]
    runs += [({**lora, "seed": 2, "train_loss": spiked, "key": "the spike"}, "0000000000" * 3)]
    path = _file(tmp_path, runs)
    claim = evidence.Claim("r = 64 reaches full fine-tuning", "4", lora, full)
    row = evidence.ledger({"lm": path}, {"lm": (claim,)}, learned=False).iloc[0]
    assert row["A"] == pytest.approx(0.8 * 2 / 3) and row["difference"] == pytest.approx(-0.8 / 3)
    # the rule fixed before the runs keeps the spiked run: its seed, drawn in 70% of the resamples,
    # pulls the interval far down; in the other 30% the difference is 0
    assert row["low"] < -0.6 and row["high"] == 0 and row["verdict"] == "undecided"
    assert row["spikes"] == 1 and row["spiked"] == "r=64 all, seed 2 (step 26)"
    assert row["without spikes"].startswith("+0.000 [+0.000, +0.000] (2 seeds): provisional: reaches")
    sentence = evidence.claim_sentence(row)
    assert "1 run had a loss spike" in sentence and "post hoc and not the verdict" in sentence
    quiet = evidence.ledger({"lm": path}, {"lm": (evidence.LM_CLAIMS[0],)}, learned=False).iloc[0]
    assert quiet["spiked"] == "" and "spike" not in evidence.claim_sentence(quiet)
    table = evidence.stability_table(evidence.test_runs(path)[1])
    assert list(table.index) == ["r=64 all", "full"]  # the constant reply has no losses
    assert list(table["spikes"]) == [1, 0] and list(table["learned"]) == [3, 3]
    # the running mean from the step it learned (index 10, when the first loss leaves the window):
    # the spike's last 10 steps are all 4.0; a calm run stays at 0.05
    assert list(table["peak after learning / first loss"]) == [2.0, pytest.approx(0.05 / 2.0)]
    assert list(table["final loss / first loss"]) == [2.0, pytest.approx(0.05 / 2.0)]
    # a classifier that collapsed to one class: it never learned, and ends at its first loss
    collapsed = {**lora, "r": 8, "seed": 0, "train_loss": [0.69] + [0.6] * 20 + [0.69] * 20}
    row = evidence.stability_table([collapsed]).iloc[0]
    assert row["seeds"] == 1 and row["learned"] == 0 and row["spikes"] == 0
    assert np.isnan(row["peak after learning / first loss"])
    assert row["final loss / first loss"] == pytest.approx(1.0)


def test_records_name_the_commands_that_made_them(tmp_path):
    made = [{"command": "/x/src/lorabook/record.py --model lm --only lm|full|* --out f", "created": "a"},
            {"command": "/x/src/lorabook/record.py --model lm --only lm|full|* --out f", "created": "b"},
            {"command": "/x/src/lorabook/record.py --worker --queue q --out f.shard3", "created": "c"}]
    runs = [({"method": "full", "seed": s, "provenance": p}, "1100") for s, p in enumerate(made)]
    rec = evidence.load("lm", _file(tmp_path, runs).parent)
    assert rec.provenance["commands"] == (
        "2 runs: python -m lorabook.record --model lm --only lm|full|* --out f; "
        "1 run: a worker of python -m lorabook.record --workers N (its command line was not stored)")


def test_commands_that_differ_in_their_patterns_share_a_line():
    made = [{"command": f"/x/src/lorabook/record.py --model lm --only {p} --out f"}
            for p in ("lm|full|*", "lm|full|*", "lm|prefix|*")]
    made.append({"command": "/x/src/lorabook/record.py --model lm --only a --only b --out g"})
    assert evidence._commands(made) == (
        "3 runs: python -m lorabook.record --model lm --out f, each with --only one of: "
        "lm|full|*, lm|prefix|*; 1 run: python -m lorabook.record --model lm --only a --only b --out g")


def test_a_worker_records_its_parents_command(monkeypatch):
    from lorabook import experiments

    monkeypatch.setattr("sys.argv", ["record.py", "--worker", "--queue", "q"])
    assert experiments.provenance()["command"] == "record.py --worker --queue q"
    monkeypatch.setenv("LORABOOK_PARENT_COMMAND", "record.py --model lm --workers 11 --out f")
    assert experiments.provenance()["command"] == "record.py --model lm --workers 11 --out f"


def test_short_label_names_a_4bit_base_so_a_spike_says_which_side_it_is_on():
    lora = {"method": "lora", "r": 64, "targets": "all", "scaling": "rslora"}
    assert evidence.short_label({**lora, "base": "float"}) == evidence.short_label(lora) == "r=64 all"
    assert evidence.short_label({**lora, "base": "fp4", "dense_base": True}) == "r=64 all fp4"
    assert evidence.short_label({**lora, "scaling": "lora", "base": "nf4"}) == "r=64 all a/r nf4"


def test_the_4bit_paths_cost_is_set_beside_its_dense_stand_in_on_the_same_machine(tmp_path):
    cpu = {"platform": "Linux-x86_64", "device": "cpu", "device_name": "x86_64", "cpu_threads": 2,
           "cpu_model": "Xeon", "cpu_capability": "AVX512"}
    gpu = {"platform": "Linux-x86_64", "device": "cuda", "device_name": "NVIDIA H100", "cpu_threads": 16}
    avx2 = {**cpu, "cpu_capability": "AVX2"}
    unknown = {k: v for k, v in cpu.items() if not k.startswith("cpu_")} | {"cpu_threads": 2}
    lora = {"method": "lora", "r": 8, "targets": "all", "scaling": "rslora", "seed": 0, "lr": 4e-3}
    gb = 2**30
    amp = "float32 weights, bfloat16 autocast"

    def run(base, dense, machine, step_s, rise_gb, score, seed=0, dtype=amp):
        return ({**lora, "seed": seed, "base": base, "dense_base": dense, "provenance": machine,
                 "dtype": dtype,
                 "step_s": step_s,
                 "memory_increase_bytes": rise_gb * gb, "peak_memory_bytes": 2 * rise_gb * gb,
                 "eval_s": 60.0, "score": score}, "1100")

    runs = [run("nf4", None, cpu, 6.0, 3, 0.5), run("nf4", True, cpu, 4.0, 6, 0.6),
            run("fp4", None, gpu, 0.3, 1, 0.5), run("fp4", True, cpu, 4.0, 6, 0.6),  # not paired
            run("int4", None, avx2, 30.0, 3, 0.5), run("int4", True, cpu, 4.0, 6, 0.6),  # nor these
            run("nf4", None, unknown, 6.0, 3, 0.5, seed=1),  # nor a CPU not named
            run("nf4", True, unknown, 4.0, 6, 0.6, seed=1),
            run("nf4", None, cpu, 13.0, 3, 0.5, seed=2, dtype="float32"),  # nor fp32 with bf16
            run("nf4", True, cpu, 4.0, 6, 0.6, seed=2),
            run("float", None, cpu, 4.0, 6, 0.6)]
    _, records = evidence.test_runs(_file(tmp_path, runs).rename(tmp_path / "qlora_record.jsonl"))
    table = evidence.four_bit_path_costs(records)
    assert list(table["base"]) == ["NF4 + DQ"] and list(table["seed"]) == [0]  # the others: other
    # machines (FP4: GPU and CPU; Int4: AVX2 and AVX512), CPUs not recorded (NF4, seed 1), or
    # other dtypes (NF4, seed 2: fp32 beside bf16 autocast)
    row = table.iloc[0]
    assert (row["time x"], row["memory rise x"]) == (1.5, 0.5)
    assert (row["memory rise (GB), 4-bit codes"], row["peak (GB), dense Q(W0)"]) == (3, 12)
    assert row["machine"] == "CPU, 2 threads" and row["exact, dense Q(W0)"] == 0.6
    assert row["dtype"] == amp
    assert evidence.four_bit_path_costs([]).empty
