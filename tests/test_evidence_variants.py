"""Chapter 8's claims in the ledger (lorabook.evidence.variants_ledger): no record yet, then
verdicts computed from a variants file (here a synthetic one, so the rule is checked exactly)."""

from __future__ import annotations

from lorabook import evidence
from lorabook.config import get_settings
from lorabook.results import append_record, open_results


def test_no_record_yet(tmp_path):
    table = evidence.variants_ledger(tmp_path)
    assert len(table) == len(evidence.VARIANT_CLAIMS["lm"]) + len(evidence.VARIANT_CLAIMS["encoder"])
    assert table["verdict"].str.startswith("no records yet").all()
    assert set(table["chapter"]) == {"8"}


def _run(seed: int, per_example: str, **fields) -> dict:
    spec = {"model": "encoder", "method": "lora", "targets": "all", "base": "float", "split": None,
            "seed": seed, **fields}
    key = "|".join(f"{k}={v}" for k, v in sorted(spec.items()))
    return {**spec, "key": key, "per_example": per_example,
            "score": per_example.count("1") / len(per_example)}


def test_verdicts_from_a_variants_file(tmp_path):
    path = tmp_path / "encoder_variants_record.jsonl"
    open_results(path, get_settings("fast"))
    n = 200
    for seed in range(3):
        append_record(path, _run(seed, "0" * n, r=8, scaling="rslora", variant=None))  # LoRA: 0
        append_record(path, _run(seed, "1" * n, r=8, scaling="rslora", variant="dora"))  # DoRA: 1
        append_record(path, _run(seed, "0" * n, r=256, scaling="rslora", variant="vera"))  # = LoRA
    assert evidence.variants_record_path("encoder", tmp_path) == path
    table = evidence.variants_ledger(tmp_path).set_index("claim")
    dora = table.loc[evidence.VARIANT_CLAIMS["encoder"][0].talk]
    assert dora["verdict"] == "holds" and dora["difference"] == 1.0 and dora["seeds"] == 3
    vera = table.loc[[c.talk for c in evidence.VARIANT_CLAIMS["encoder"] if "VeRA" in c.talk][0]]
    assert vera["verdict"] == "reaches" and vera["difference"] == 0.0
    pissa = table.loc[[c.talk for c in evidence.VARIANT_CLAIMS["encoder"] if "PiSSA" in c.talk][0]]
    assert pissa["verdict"] == "no records yet (A)"
    assert table.loc[[c.talk for c in evidence.VARIANT_CLAIMS["lm"]][0], "verdict"].startswith(
        "no records yet")
