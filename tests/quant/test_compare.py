"""lorabook.quant.compare: error tables and models stored in each format, against bitsandbytes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

BF = pytest.importorskip("bitsandbytes.functional")

from lorabook.data import collate_causal  # noqa: E402
from lorabook.quant import LinearNF4, compare, quantize_4bit, quantize_nf4  # noqa: E402


def bnb_roundtrip(W: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    """bitsandbytes' quantize + dequantize of W, on the flat tensor (its 2-D CPU kernel mis-scales
    rows whose length is not a multiple of the blocksize)."""
    packed, qs = BF.quantize_4bit(W.reshape(-1), blocksize=blocksize, quant_type=quant_type)
    return BF.dequantize_4bit(packed, qs, quant_type=quant_type).reshape(W.shape)


def test_quantization_error_against_bitsandbytes():
    torch.manual_seed(0)
    W = torch.randn(96, 160) * 0.03
    for qt in ("nf4", "fp4"):
        err = bnb_roundtrip(W, qt, 64) - W
        got = compare.quantization_error(W, qt, 64)
        assert got["mae"] == pytest.approx(err.abs().mean().item(), rel=1e-6)
        assert got["mae_over_std"] == pytest.approx(err.abs().mean().item() / W.std().item(), rel=1e-6)
        assert got["rel_fro"] == pytest.approx((err.norm() / W.norm()).item(), rel=1e-6)
        assert got["numel"] == W.numel()


def test_bitsandbytes_anchor_on_gaussian_data():
    # bitsandbytes' tests/test_functional.py: NF4, N(0, 1) 1024 x 1024, blocksize 64 -> 0.072792
    A = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    row = compare.error_table([A], ["nf4"], [64])[0]
    assert row["mae"] == pytest.approx(0.072792, abs=1e-3)
    assert row["mae_over_std"] == pytest.approx(row["mae"], rel=2e-3)  # std(A) ~ 1


@pytest.mark.parametrize("shapes", [[(64, 128), (32, 64), (128, 32)],  # one joined call
                                    [(37, 129), (64, 64)]])  # 4773 is no multiple: one by one
def test_error_table_is_the_weighted_mean_of_each_weight(shapes):
    torch.manual_seed(1)
    weights = {str(s): torch.randn(s) * (0.01 + i) for i, s in enumerate(shapes)}
    rows = compare.error_table(weights, ["nf4", "int4"], [32, 64])
    total = sum(W.numel() for W in weights.values())
    assert [(r["quant_type"], r["blocksize"]) for r in rows] == [
        ("nf4", 32), ("nf4", 64), ("int4", 32), ("int4", 64)]
    for row in rows:
        each = [compare.quantization_error(W, row["quant_type"], row["blocksize"])
                for W in weights.values()]
        for key in ("mae", "mae_over_std", "rel_fro"):
            expected = sum(e[key] * e["numel"] for e in each) / total
            assert row[key] == pytest.approx(expected, rel=1e-5)


def test_sample_weights_keeps_the_first_blocks():
    torch.manual_seed(2)
    weights = {"a": torch.randn(512, 96), "b": torch.randn(64, 64), "c": torch.randn(300, 200)}
    sample = compare.sample_weights(weights, numel=3 * 8192)
    assert sample["a"].numel() == 8192 and sample["c"].numel() == 8192
    assert sample["b"].numel() == 4096  # shorter than its share: whole
    for name, s in sample.items():
        assert s.numel() % 4096 == 0
        full, _ = quantize_nf4(weights[name], 4096)
        part, _ = quantize_nf4(s, 4096)
        assert torch.equal(part, full[: part.numel()])  # the same blocks, the same codes
    with pytest.raises(ValueError):
        compare.sample_weights({}, 10)


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LinearNF4)) and not n.endswith("lm_head")}


def test_model_in_format_copies_and_matches_bitsandbytes(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    nf4 = compare.model_in_format(tiny_llama, "nf4")
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())
    original = _linears(tiny_llama)
    swapped = _linears(nf4)
    assert set(swapped) == set(original) and len(swapped) == 14
    assert all(isinstance(m, LinearNF4) for m in swapped.values())
    assert isinstance(nf4.lm_head, nn.Linear)  # skipped, tied to the embeddings
    for name, m in swapped.items():
        W = original[name].weight.detach()
        assert torch.equal(m.dequantized_weight(), bnb_roundtrip(W, "nf4", 64))
    bf16 = compare.model_in_format(tiny_llama, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert next(tiny_llama.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown format"):
        compare.model_in_format(tiny_llama, "int3")
    with pytest.raises(ValueError, match="blocksize"):
        compare.model_in_format(tiny_llama, "nf4", blocksize=48)


def test_weight_bits_closed_form(tiny_llama):
    sizes = [m.weight.numel() for m in _linears(tiny_llama).values()]
    n = sum(sizes)
    assert compare.weight_bits(tiny_llama) == 32
    assert compare.weight_bits(compare.model_in_format(tiny_llama, "bf16")) == 16
    for fmt in ("nf4", "fp4", "int4"):  # every size is a multiple of 64: 4 + 32 / 64
        assert compare.weight_bits(compare.model_in_format(tiny_llama, fmt)) == pytest.approx(4.5)
    # DQ: 4-bit codes, one 8-bit code per block, one fp32 absmax per 256 blocks, one fp32 offset
    dq_bits = sum(8 * (k / 2 + k / 64 + 4 * math.ceil(k / 64 / 256) + 4) for k in sizes) / n
    got = compare.weight_bits(compare.model_in_format(tiny_llama, "nf4+dq"))
    assert got == pytest.approx(dq_bits)


def _items(seed: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        prompt = torch.randint(3, 128, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g)
        target = torch.randint(3, 128, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        items.append({"input_ids": prompt.tolist() + target.tolist(),
                      "labels": [-100] * len(prompt) + target.tolist()})
    return items


def test_target_loss_is_the_token_weighted_hf_loss(tiny_llama):
    batches = [collate_causal(_items(0, 3)), collate_causal(_items(1, 2))]
    got = compare.target_loss(tiny_llama, batches)
    with torch.no_grad():
        losses = [tiny_llama(**b).loss.item() for b in batches]  # mean over each batch's tokens
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    expected = sum(loss * c for loss, c in zip(losses, counts, strict=True)) / sum(counts)
    assert got["tokens"] == sum(counts)
    assert got["nll"] == pytest.approx(expected, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    masked = collate_causal([{"input_ids": [5, 6, 7], "labels": [-100] * 3}])
    with pytest.raises(ValueError, match="supervised"):
        compare.target_loss(tiny_llama, [masked])


def test_compare_formats_rows(tiny_llama):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = tiny_llama(input_ids=ids).logits

    def logit_error(model):
        with torch.no_grad():
            return (model(input_ids=ids).logits.float() - reference).abs().max().item()

    rows = compare.compare_formats(tiny_llama, {"logit_error": logit_error}, progress=False)
    assert [r["format"] for r in rows] == list(compare.FORMATS)
    by = {r["format"]: r for r in rows}
    assert by["fp32"]["logit_error"] == 0
    assert 0 < by["bf16"]["logit_error"] < by["int4"]["logit_error"]
    assert by["fp32"]["model_bytes"] == 2 * by["bf16"]["model_bytes"]
    assert by["nf4"]["model_bytes"] < by["bf16"]["model_bytes"]
    assert by["nf4"]["weight_bits"] == pytest.approx(4.5)
    assert all(r["convert_s"] >= 0 and r["metrics_s"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="unknown format"):
        compare.compare_formats(tiny_llama, {}, formats=["fp8"], progress=False)


@pytest.mark.parametrize("double_quant", [False, True])
def test_diff_with_bitsandbytes_counts_differences(double_quant):
    torch.manual_seed(4)
    W = torch.randn(7, 96)  # rows that are no multiple of the blocksize
    packed, state = quantize_nf4(W, 64, double_quant=double_quant)
    same = compare.diff_with_bitsandbytes(W, packed, state)
    assert same == {"bytes": 336, "differing_bytes": 0, "differing_absmax": 0,
                    "differing_offset": 0, "max_abs_dequant_diff": 0.0}
    broken = packed.clone()
    broken[5] ^= 0xFF
    state.absmax = state.absmax.clone()
    state.absmax[0] += 1
    diff = compare.diff_with_bitsandbytes(W, broken, state)
    assert diff["differing_bytes"] == 1 and diff["differing_absmax"] == 1
    assert diff["max_abs_dequant_diff"] > 0


def test_diff_with_bitsandbytes_bad_input():
    W = torch.randn(4, 64)
    packed, state = quantize_4bit(W, "int4", 64)
    with pytest.raises(ValueError, match="no 4-bit format"):
        compare.diff_with_bitsandbytes(W, packed, state)
    packed, state = quantize_nf4(W, 64)
    with pytest.raises(ValueError, match="shape"):
        compare.diff_with_bitsandbytes(W.T, packed, state)


def test_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        compare.error_table([])
    with pytest.raises(ValueError, match="blocksize"):
        compare.error_table([torch.randn(64)], blocksizes=[100])
    with pytest.raises(ValueError, match="quant_type"):
        compare.quantization_error(torch.randn(64), "nf3")


def test_weight_stats_on_gaussian_and_heavy_tails():
    g = torch.Generator().manual_seed(5)
    gauss = compare.weight_stats([torch.randn(1024, 1024, generator=g) * 0.02])
    assert gauss["numel"] == 1024 * 1024
    assert abs(gauss["excess_kurtosis"]) < 0.02
    assert gauss["beyond_3_std"] == pytest.approx(0.0027, abs=3e-4)  # 2 * (1 - Phi(3))
    # E[max of 64 |N(0, 1)|] = integral over x >= 0 of 1 - erf(x / sqrt(2))^64 = 2.596
    x = torch.linspace(0, 10, 100001, dtype=torch.float64)
    expected = torch.trapezoid(1 - torch.erf(x / 2**0.5) ** 64, x).item()
    assert gauss["block_absmax_std"] == pytest.approx(expected, abs=0.01)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1 << 20,))
    assert compare.weight_stats([laplace])["excess_kurtosis"] == pytest.approx(3.0, abs=0.2)
    with pytest.raises(ValueError):
        compare.weight_stats([])


def test_distinct_per_block_sees_a_4bit_grid():
    g = torch.Generator().manual_seed(6)
    q = torch.randint(0, 16, (64, 32), generator=g).float()  # Q4_1: w = m + d * q per block
    d, m = torch.rand(64, 1, generator=g), torch.randn(64, 1, generator=g)
    grid = (m + d * q).reshape(-1)
    assert int(compare.distinct_per_block(grid).max()) <= 16
    assert torch.equal(compare.distinct_per_block(grid), 1 + (q.sort(1).values.diff(dim=1) != 0).sum(1))
    assert torch.all(compare.distinct_per_block(torch.randn(64 * 32, generator=g)) == 32)
    with pytest.raises(ValueError):
        compare.distinct_per_block(torch.randn(8))
