"""lorabook.bench: latency timing, model bytes from tensors, process memory, closed-form estimates."""

from __future__ import annotations

import copy
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorabook import bench

MiB = 1024**2


def spin(seconds: float):
    """A function that busy-waits ``seconds``: a duration that does not depend on the scheduler's sleep."""
    def fn():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    return fn


# ----------------------------------------------------------------------------- latency


def test_measure_latency_counts_calls_and_summarises():
    calls = []
    res = bench.measure_latency(lambda: (calls.append(1), spin(0.001)()), warmup=2, repeats=5)
    assert len(calls) == 7  # warm-up calls are made but not timed
    assert len(res.samples_s) == 5
    assert res.p10_s <= res.median_s <= res.p90_s
    assert res.median_s >= 0.001
    assert res["median_s"] == res.median_s  # dict-style access
    assert "samples_s" not in res.as_dict() and res.iqr_s >= 0


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"repeats": 2.5}])
def test_measure_latency_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError, match="warmup|repeats"):
        bench.measure_latency(lambda: None, **kwargs)


def test_measure_latency_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        bench.measure_latency(3)


def test_compare_latency_interleaves_round_robin_with_rotation():
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    bench.compare_latency(fns, baseline="a", warmup=1, repeats=3)
    timed = log[3:]  # after one warm-up round
    rounds = [timed[i:i + 3] for i in range(0, 9, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every variant once per round
    assert [r[0] for r in rounds] == ["a", "b", "c"]  # the order rotates


def test_compare_latency_sequential_when_not_interleaved():
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "ab"}
    res = bench.compare_latency(fns, baseline="a", warmup=1, repeats=2, interleave=False)
    assert log == ["a"] * 3 + ["b"] * 3
    assert res["b"].ratio_p10 is None  # no paired rounds without interleaving


class FakeClock:
    """A perf_counter stand-in: each variant 'takes' exactly its cost, so ratios are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float):
        def fn():
            self.now += seconds
        return fn


def test_compare_latency_ratios(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    res = bench.compare_latency({"fast": clock.work(0.002), "slow": clock.work(0.004)},
                                baseline="fast", warmup=1, repeats=7)
    assert res["fast"].ratio == 1.0
    assert res["slow"].ratio == pytest.approx(2.0)  # twice the work, measured by the same clock
    assert res["slow"].ratio_p10 == pytest.approx(2.0) and res["slow"].ratio_p90 == pytest.approx(2.0)
    assert res["slow"].ratio_p50 == pytest.approx(2.0)
    assert res["slow"].median_s == pytest.approx(0.004)
    assert bench.latency_ratio(res["slow"], res["fast"]) == res["slow"].ratio
    rows = bench.latency_table(res, unit="ms")
    assert [r["variant"] for r in rows] == ["fast", "slow"]
    assert rows[1]["median_ms"] == pytest.approx(4.0)


def test_compare_latency_rejects_bad_arguments():
    with pytest.raises(ValueError, match="baseline"):
        bench.compare_latency({"a": lambda: None}, baseline="b")
    with pytest.raises(ValueError, match="at least one"):
        bench.compare_latency({}, baseline="a")
    with pytest.raises(TypeError, match="not callable"):
        bench.compare_latency({"a": lambda: None, "b": 1}, baseline="a")
    with pytest.raises(ValueError, match="unit"):
        bench.latency_table({}, unit="minutes")


class CountingLM(nn.Module):
    """Wraps an LM: records each call's input shape and grad mode, and 'takes' ``cost`` on a clock."""

    def __init__(self, lm, clock=None, cost=0.0):
        super().__init__()
        self.model, self.clock, self.cost, self.calls = lm, clock, cost, []

    def forward(self, input_ids):
        self.calls.append((tuple(input_ids.shape), torch.is_grad_enabled(), input_ids.max().item()))
        if self.clock is not None:
            self.clock.now += self.cost
        return self.model(input_ids=input_ids)


def test_compare_forward_latency_times_each_model_on_one_batch(tiny_llama, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    plain, slow = CountingLM(tiny_llama, clock, 0.010), CountingLM(tiny_llama, clock, 0.013)
    res = bench.compare_forward_latency({"plain": plain, "slow": slow}, batch_size=3, seq_len=5,
                                        baseline="plain", warmup=2, repeats=4)
    for m in (plain, slow):
        assert len(m.calls) == 2 + 4  # warm-up + timed calls
        assert all(shape == (3, 5) and not grad and top < 128 for shape, grad, top in m.calls)
    assert res["plain"].ratio == 1.0 and res["slow"].ratio == pytest.approx(1.3)
    assert res["slow"].median_s == pytest.approx(0.013)


def test_compare_forward_latency_rejects_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="batch_size"):
        bench.compare_forward_latency({"a": tiny_llama}, 0, 4, "a")
    with pytest.raises(ValueError, match="seq_len"):
        bench.compare_forward_latency({"a": tiny_llama}, 1, 2.5, "a")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bench.compare_forward_latency({"a": lambda: None}, 1, 4, "a")
    with pytest.raises(ValueError, match="vocab_size"):
        bench.compare_forward_latency({"a": nn.Linear(2, 2)}, 1, 4, "a")
    with pytest.raises(ValueError, match="baseline"):
        bench.compare_forward_latency({"a": tiny_llama}, 1, 4, "b")


# ----------------------------------------------------------------------------- model bytes


def test_model_bytes_linear_by_dtype():
    lin = nn.Linear(10, 20)
    assert bench.model_bytes(lin) == (10 * 20 + 20) * 4
    assert bench.model_bytes(lin.to(torch.bfloat16)) == (10 * 20 + 20) * 2


def test_model_bytes_counts_packed_uint8_buffers_and_tied_weights_once():
    m = nn.Module()
    m.a = nn.Linear(8, 4, bias=False)
    m.b = nn.Linear(8, 4, bias=False)
    m.b.weight = m.a.weight  # tied
    m.register_buffer("packed", torch.zeros(33, 1, dtype=torch.uint8))  # 66 4-bit codes
    assert bench.model_bytes(m) == 8 * 4 * 4 + 33
    assert bench.model_bytes(m, buffers=False) == 8 * 4 * 4


def test_model_bytes_tiny_llama_closed_form(tiny_llama):
    d, kv, ff, vocab, layers = 32, 16, 64, 128, 2  # kv = 2 KV heads x head_dim 8
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff + 2 * d  # q, o, k, v, MLP, two norms
    n_params = vocab * d + layers * per_layer + d  # embedding tied with lm_head; final norm
    assert bench.model_bytes(tiny_llama, buffers=False) == 4 * n_params


def test_model_bytes_adds_quant_state_constants():
    w = nn.Parameter(torch.zeros(32, 1, dtype=torch.uint8), requires_grad=False)  # 64 codes
    code = torch.zeros(16)
    w.quant_state = SimpleNamespace(absmax=torch.zeros(1, dtype=torch.uint8), code=code,
                                    offset=torch.tensor(0.0),
                                    state2=SimpleNamespace(absmax=torch.zeros(1), code=code,
                                                           state2=None))
    m = nn.Module()
    m.weight = w
    # packed + uint8 absmax + one 16-entry fp32 code (shared, counted once) + offset + fp32 absmax2
    assert bench.model_bytes(m) == 32 + 1 + 64 + 4 + 4


def test_model_bytes_bitsandbytes_nf4_double_quant():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 128, bias=False, quant_type="nf4",
                              compress_statistics=True).to("cpu")
    if layer.weight.dtype != torch.uint8:
        pytest.skip("this bitsandbytes does not quantize on CPU")
    n = 64 * 128
    # codes (n/2) + uint8 absmax (n/64) + NF4 code (16 fp32) + offset + fp32 absmax2 + 8-bit code
    expected = n // 2 + n // 64 + 16 * 4 + 4 + 1 * 4 + 256 * 4
    assert bench.model_bytes(layer) == expected


def test_parameter_bytes_breakdown():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    m[0].requires_grad_(False)
    m.register_buffer("b", torch.zeros(3, dtype=torch.float16))
    out = bench.parameter_bytes_breakdown(m)
    assert out["frozen"] == 20 * 4 and out["trainable"] == 10 * 4 and out["buffers"] == 6
    assert out["total"] == bench.model_bytes(m)
    assert out["by_dtype"] == {"float32": 120, "float16": 6}
    with pytest.raises(TypeError, match="nn.Module"):
        bench.model_bytes(torch.zeros(3))


# ----------------------------------------------------------------------------- process memory


def test_rss_readings_are_consistent(monkeypatch):
    rss = bench.current_rss_bytes()
    assert 0 < rss <= bench.peak_rss_bytes()
    assert bench.peak_memory("cpu") >= rss
    monkeypatch.setitem(sys.modules, "psutil", None)  # fall back to /proc/self/statm
    if sys.platform.startswith("linux"):
        assert abs(bench.current_rss_bytes() - rss) < 32 * MiB


def test_track_memory_cpu_sees_a_64_mib_tensor():
    with bench.track_memory("cpu") as m:
        x = torch.ones(16 * MiB)  # 64 MiB of float32, touched
    assert m.method in ("rss_peak_reset", "rss_sampling")
    assert m.delta_bytes >= 48 * MiB
    assert m.end_bytes >= m.start_bytes + 48 * MiB
    del x


def test_memory_sampler_by_sampling_alone():
    with bench.MemorySampler("cpu", interval_s=0.001, reset_peak=False) as s:
        x = torch.ones(16 * MiB)
        time.sleep(0.01)
    assert s.method == "rss_sampling" and s.n_samples >= 1
    assert s.delta_bytes == s.increase_bytes >= 48 * MiB
    del x
    with pytest.raises(ValueError, match="interval_s"):
        bench.MemorySampler("cpu", interval_s=0)


def test_memory_sampler_sees_a_freed_spike_through_the_kernel_peak():
    with bench.MemorySampler("cpu", interval_s=10.0) as s:  # no sample lands inside the block
        x = torch.ones(16 * MiB)
        del x
    if s.method != "rss_peak_reset":
        pytest.skip("the kernel refused to reset the peak RSS here")
    assert s.delta_bytes >= 48 * MiB


def test_reset_peak_memory_on_linux_lowers_the_peak():
    x = torch.ones(32 * MiB)  # 128 MiB
    del x
    high = bench.peak_rss_bytes()
    if not bench.reset_peak_memory("cpu"):
        pytest.skip("the kernel refused to reset the peak RSS here")
    assert bench.peak_rss_bytes() < high - 64 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_release_free_memory_gives_freed_heap_pages_back():
    xs = [torch.ones(8 * 1024) for _ in range(2000)]  # 32 KiB each, 64 MiB in all: heap blocks
    keep = xs[-1]  # noqa: F841  (holds the top of the heap, so free() alone cannot shrink it)
    del xs
    kept = bench.current_rss_bytes()
    assert bench.release_free_memory() is True
    assert bench.current_rss_bytes() < kept - 32 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_memory_sampler_counts_reused_free_blocks():
    xs = [torch.ones(8 * 1024) for _ in range(2000)]
    keep = xs[-1]  # noqa: F841
    del xs  # 64 MiB of freed blocks, resident
    with bench.MemorySampler("cpu") as s:
        ys = [torch.ones(8 * 1024) for _ in range(2000)]  # the same blocks, reused
    assert s.released and s.delta_bytes >= 48 * MiB
    del ys


def test_release_free_memory_elsewhere_changes_nothing(monkeypatch):
    monkeypatch.setattr(bench, "_glibc", lambda: None)
    assert bench.release_free_memory() is False
    with bench.MemorySampler("cpu") as s:
        pass
    assert s.released is False


def test_bad_device_rejected():
    with pytest.raises(ValueError, match="cpu' or 'cuda"):
        bench.peak_memory("meta")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_and_latency():
    with bench.track_memory("cuda") as m:
        x = torch.ones(16 * MiB, device="cuda")
    assert m.method == "cuda_max_allocated" and m.delta_bytes >= 64 * MiB
    assert bench.peak_memory("cuda") >= 64 * MiB
    a = torch.randn(1024, 1024, device="cuda")
    res = bench.measure_latency(lambda: a @ a, warmup=2, repeats=5)
    assert res.median_s > 0
    del x


# ----------------------------------------------------------------------------- estimates


def test_training_memory_estimate_fp32_and_mixed_precision():
    n = 1_000_000
    fp32 = bench.training_memory_estimate(n, n)
    assert (fp32["weights"], fp32["gradients"], fp32["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert fp32["bytes_per_param"] == 16
    mixed = bench.training_memory_estimate(n, n, weight_bytes=2, grad_bytes=2, master_weights=True)
    assert mixed["master_weights"] == 4 * n and mixed["total"] == 16 * n


def test_training_memory_estimate_lora_and_nf4():
    est = bench.training_memory_estimate(1000, 10)  # LoRA: few trainable parameters
    assert est == {"weights": 4000, "gradients": 40, "optimizer": 80, "master_weights": 0,
                   "total": 4120, "bytes_per_param": 4.12}
    nf4 = bench.training_memory_estimate(64_000, 0, weight_bytes=0.5 + 0.127 / 8, optimizer="sgd")
    assert nf4["weights"] == round(64_000 * (0.5 + 0.127 / 8)) and nf4["optimizer"] == 0


@pytest.mark.parametrize("args, kwargs", [
    ((10, 11), {}), ((-1, 0), {}), ((10, 5), {"optimizer": "lion"}), ((10, 5), {"weight_bytes": 0}),
])
def test_training_memory_estimate_rejects_bad_input(args, kwargs):
    with pytest.raises(ValueError):
        bench.training_memory_estimate(*args, **kwargs)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.50 KiB"), (3 * 1024**3, "3.00 GiB"), (-2048, "-2.00 KiB"),
])
def test_format_bytes(n, text):
    assert bench.format_bytes(n) == text


# ----------------------------------------------------------------------------- LoRA code speed


def test_shaped_lm_has_the_published_shape():
    import dataclasses

    from lorabook.qlora import ARCHITECTURES, architecture_from_config, parameter_counts

    model = bench.shaped_lm("SmolLM2-135M", layers=1)
    arch = ARCHITECTURES["SmolLM2-135M"]
    got = architecture_from_config(model.config, arch.name)
    assert (got.hidden, got.intermediate, got.heads, got.kv_heads, got.vocab, got.tied) == (
        arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.vocab, arch.tied)
    expected = parameter_counts(dataclasses.replace(arch, layers=1))["total"]
    assert sum(p.numel() for p in model.parameters()) == expected
    assert not model.training


@pytest.mark.parametrize("kwargs, match", [({"arch": "GPT-5"}, "unknown architecture"),
                                           ({"layers": 0}, "layers"), ({"layers": 31}, "layers")])
def test_shaped_lm_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.shaped_lm(**kwargs)


def _lora_tiny(tiny_llama):
    from lorabook.lora import apply_lora

    return apply_lora(tiny_llama, ["q_proj", "v_proj"], r=4, alpha=8)


def test_train_step_runs_one_adamw_step_on_the_trainable_parameters(tiny_llama):
    model = _lora_tiny(tiny_llama).train()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        expected = model(**batch).loss.item()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    B = model.model.layers[0].self_attn.q_proj.B
    step = bench.train_step(model, batch, lr=1e-2)
    loss = step()
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # the loss before the update
    assert B.abs().sum() > 0  # B started at zero: AdamW moved it
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert step().item() < loss.item()  # same batch, one step later: lower loss


def test_train_step_rejects_bad_input(tiny_llama):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        bench.train_step(_lora_tiny(copy.deepcopy(tiny_llama)), {"input_ids": ids})
    with pytest.raises(ValueError, match="no trainable"):
        bench.train_step(tiny_llama.requires_grad_(False), {"input_ids": ids, "labels": ids})


def test_compare_lora_speed_times_the_variants_and_checks_parity(tiny_llama):
    import json

    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    res = bench.compare_lora_speed(tiny_llama, r=4, alpha=8, batch_size=2, seq_len=8,
                                   forward_shapes=((1, 8), (2, 4)), warmup=1, repeats=2)
    assert set(res["train_step"]) == {"peft", "lorabook"}
    assert res["train_step"]["peft"].ratio == 1.0 and res["train_step"]["lorabook"].ratio > 0
    assert set(res["forward"]) == {"1x8", "2x4"}
    assert all(set(r) == {"base", "merged", "unmerged"} for r in res["forward"].values())
    assert all(len(v.samples_s) == 2 for r in res["forward"].values() for v in r.values())
    # same adapter (B non-zero) in both libraries, and merging keeps the function
    assert res["parity"]["max_abs_logit_diff_peft"] < 1e-5
    assert res["parity"]["max_abs_logit_diff_merged"] < 1e-4
    # the base model is left as it was: no LoRA layers, same weights
    from lorabook.lora import lora_layers

    assert not list(lora_layers(tiny_llama))
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())
    out = bench.lora_speed_as_dict(res)
    assert json.loads(json.dumps(out))["config"]["forward_shapes"] == [[1, 8], [2, 4]]
    assert "samples_s" not in out["train_step"]["peft"]


def test_compare_lora_speed_rejects_bad_shapes(tiny_llama):
    with pytest.raises(ValueError, match="integers >= 1"):
        bench.compare_lora_speed(tiny_llama, batch_size=0)
    with pytest.raises(TypeError, match="causal LM"):
        bench.compare_lora_speed(nn.Linear(2, 2))
