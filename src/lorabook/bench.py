"""Latency and memory measurement, shared by every chapter that measures (chapter 1).

Latency: ``measure_latency`` times one function (warm-up, repeats, median); ``compare_latency``
times several variants *interleaved*, round by round, so that machine noise (other processes,
frequency scaling) hits all of them alike, and reports each median as a ratio to a baseline.

Memory: ``model_bytes`` counts the bytes of a model's tensors; ``peak_memory`` is CUDA's max
allocated on a GPU and the process's peak resident set size (RSS) on a CPU; ``track_memory``
measures the peak above the starting point during a block of code; ``training_memory_estimate``
is the closed-form budget of weights, gradients and optimizer state.

A note on CPU peaks. The process peak RSS (``ru_maxrss``, ``VmHWM``) only ever grows, unless the
kernel lets us reset it (Linux: write ``5`` to ``/proc/self/clear_refs``). ``reset_peak_memory``
tries that and reports whether it worked; ``MemorySampler`` (and ``track_memory``) also runs a
thread that samples RSS every few milliseconds, so it gives a useful peak where the reset is refused.
RSS counts every allocation of the process (Python objects, libraries, allocator caches), not only
tensors, so CPU deltas are approximate in a way CUDA's allocator counts are not. glibc's allocator
keeps freed blocks for reuse with their pages resident; a CPU ``MemorySampler`` first hands those
pages back (``release_free_memory``), so that a block's rise is the memory it takes from the OS:
its live tensors plus what the allocator holds between them.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from lorabook.data import skip_prompt_logits

# ----------------------------------------------------------------------------- latency


@dataclass
class LatencyResult:
    """Seconds per call of one function: median and spread of the timed repeats (chapter 1)."""

    median_s: float  # median of the timed repeats, the number chapters report
    p10_s: float  # 10th percentile
    p90_s: float  # 90th percentile
    mean_s: float
    samples_s: list[float] = field(default_factory=list)  # every timed repeat, in order
    ratio: float | None = None  # median / baseline median (compare_latency only)
    ratio_p10: float | None = None  # 10th percentile of the per-round ratios (interleaved only)
    ratio_p50: float | None = None  # their median: inside [p10, p90], unlike ``ratio``
    ratio_p90: float | None = None  # 90th percentile of the per-round ratios (interleaved only)

    @property
    def iqr_s(self) -> float:
        """Interquartile range of the samples, in seconds."""
        q1, q3 = np.percentile(self.samples_s, [25, 75])
        return float(q3 - q1)

    def __getitem__(self, key: str):
        """Dict-style access (``result["median_s"]``) for code that treats results as dicts."""
        return getattr(self, key)

    def as_dict(self, samples: bool = False) -> dict:
        """The result as a plain dict; the samples only when asked for."""
        out = asdict(self)
        if not samples:
            out.pop("samples_s")
        return out


def _summary(samples: list[float]) -> LatencyResult:
    p10, p50, p90 = np.percentile(samples, [10, 50, 90])
    return LatencyResult(float(p50), float(p10), float(p90), float(np.mean(samples)), list(samples))


def _sync(sync_cuda: bool) -> None:
    if sync_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _check_counts(warmup: int, repeats: int) -> None:
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")


def _time_once(fn: Callable[[], object], sync_cuda: bool) -> float:
    _sync(sync_cuda)
    start = time.perf_counter()
    fn()
    _sync(sync_cuda)
    return time.perf_counter() - start


def measure_latency(fn: Callable[[], object], warmup: int = 3, repeats: int = 10,
                    sync_cuda: bool = True) -> LatencyResult:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls; median and spread (chapter 1)."""
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments, got {type(fn).__name__}")
    _check_counts(warmup, repeats)
    for _ in range(warmup):
        fn()
    return _summary([_time_once(fn, sync_cuda) for _ in range(repeats)])


def compare_latency(fns: dict[str, Callable[[], object]], baseline: str, warmup: int = 3,
                    repeats: int = 10, interleave: bool = True,
                    sync_cuda: bool = True) -> dict[str, LatencyResult]:
    """Time variants round-robin and report each median as a ratio to ``baseline``'s (chapter 1).

    With ``interleave=True`` every round calls each variant once, the order rotated each round, so
    slow spells of the machine fall on all variants alike; ``ratio_p10``/``ratio_p90`` are then the
    spread of the per-round ratios (variant time / baseline time in the same round) and
    ``ratio_p50`` their median, the bar height that goes with that spread (the ratio of the two
    medians, ``ratio``, can fall outside it).
    """
    if not fns:
        raise ValueError("fns must name at least one function to time")
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {list(fns)}")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"variant {name!r} is not callable: {type(fn).__name__}")
    _check_counts(warmup, repeats)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    if interleave:
        for _ in range(warmup):
            for name in names:
                fns[name]()
        for i in range(repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:  # rotate the order: no variant always runs first
                samples[name].append(_time_once(fns[name], sync_cuda))
    else:
        for name in names:
            for _ in range(warmup):
                fns[name]()
            samples[name] = [_time_once(fns[name], sync_cuda) for _ in range(repeats)]

    results = {name: _summary(samples[name]) for name in names}
    base = results[baseline]
    for name in names:
        res = results[name]
        res.ratio = res.median_s / base.median_s
        if interleave:
            per_round = np.asarray(samples[name]) / np.asarray(samples[baseline])
            res.ratio_p10, res.ratio_p50, res.ratio_p90 = (
                float(q) for q in np.percentile(per_round, [10, 50, 90]))
    return results


def latency_ratio(result: LatencyResult, baseline: LatencyResult) -> float:
    """Median latency of ``result`` divided by that of ``baseline`` (chapter 1)."""
    return result.median_s / baseline.median_s


def latency_table(results: dict[str, LatencyResult], unit: str = "ms") -> list[dict]:
    """Rows (name, median, p10, p90 in ``unit``, ratio) for display, e.g. ``pd.DataFrame(rows)`` (chapter 1)."""
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}
    if unit not in scale:
        raise ValueError(f"unit must be one of {list(scale)}, got {unit!r}")
    k = scale[unit]
    return [
        {"variant": name, f"median_{unit}": r.median_s * k, f"p10_{unit}": r.p10_s * k,
         f"p90_{unit}": r.p90_s * k, "ratio": r.ratio}
        for name, r in results.items()
    ]


def compare_forward_latency(models: dict[str, nn.Module], batch_size: int, seq_len: int,
                            baseline: str, warmup: int = 1, repeats: int = 10,
                            vocab_size: int | None = None, seed: int = 0) -> dict[str, LatencyResult]:
    """Interleaved forward-pass latency of several LMs on one random (B, T) batch of tokens (chapter 1).

    Each model is called as ``model(input_ids=ids)`` under ``torch.inference_mode()``, with the
    same ids on its own device; ``vocab_size`` defaults to the first model's ``config.vocab_size``.
    Returns ``compare_latency``'s results (median seconds, ratio to ``baseline``).
    """
    if not models:
        raise ValueError("models must name at least one model to time")
    for name, m in models.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"model {name!r} must be a torch.nn.Module, got {type(m).__name__}")
    for arg, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {v!r}")
    if vocab_size is None:
        first = next(iter(models.values()))
        vocab_size = getattr(getattr(first, "config", None), "vocab_size", None)
        if vocab_size is None and hasattr(first, "model"):  # a wrapper such as PrefixTuning
            vocab_size = getattr(getattr(first.model, "config", None), "vocab_size", None)
        if vocab_size is None:
            raise ValueError("cannot read config.vocab_size from the first model; pass vocab_size")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)  # (B, T)

    def forward(model: nn.Module) -> Callable[[], object]:
        x = ids.to(next(model.parameters()).device)

        def fn():
            with torch.inference_mode():
                return model(input_ids=x)
        return fn

    fns = {name: forward(m) for name, m in models.items()}
    return compare_latency(fns, baseline, warmup=warmup, repeats=repeats)


# ----------------------------------------------------------------------------- model bytes


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    """Tensors of a bitsandbytes QuantState (absmax, code, offset, and the nested state2's)."""
    if qs is None:
        return []
    found = [getattr(qs, k, None) for k in ("absmax", "code", "offset")]
    tensors = [t for t in found if isinstance(t, torch.Tensor)]
    return tensors + _quant_state_tensors(getattr(qs, "state2", None))


def _unique_tensors(model: nn.Module, buffers: bool) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(kind, tensor, trainable) for each distinct tensor; tied or shared tensors counted once.

    Parameters bring their bitsandbytes quantization constants (``quant_state``) along: they live
    outside the module's parameters and buffers but are part of the weight.
    """
    items = []
    for p in model.parameters():
        items.append(("param", p, p.requires_grad))
        items += [("param", t, False) for t in _quant_state_tensors(getattr(p, "quant_state", None))]
    if buffers:
        items += [("buffer", b, False) for b in model.buffers()]
    seen: set[tuple[int, int, int]] = set()
    for kind, t, trainable in items:
        if t.device.type != "meta" and t.numel() > 0:
            key = (t.data_ptr(), t.numel(), t.element_size())
            if key in seen:
                continue
            seen.add(key)
        yield kind, t, trainable


def model_bytes(model: nn.Module, buffers: bool = True) -> int:
    """Bytes held by a model's parameters (and buffers), from the tensors themselves (chapter 1).

    Packed 4-bit weights stored as uint8 count one byte per two codes; the quantization constants
    of bitsandbytes ``Params4bit`` (kept outside the parameters, in ``quant_state``) are added.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(_tensor_bytes(t) for _, t, _ in _unique_tensors(model, buffers))


def parameter_bytes_breakdown(model: nn.Module) -> dict:
    """Bytes split into trainable / frozen parameters and buffers, and by dtype (chapter 1)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = {"trainable": 0, "frozen": 0, "buffers": 0, "by_dtype": {}}
    for kind, t, trainable in _unique_tensors(model, buffers=True):
        n = _tensor_bytes(t)
        out["buffers" if kind == "buffer" else "trainable" if trainable else "frozen"] += n
        dtype = str(t.dtype).replace("torch.", "")
        out["by_dtype"][dtype] = out["by_dtype"].get(dtype, 0) + n
    out["total"] = out["trainable"] + out["frozen"] + out["buffers"]
    return out


# ----------------------------------------------------------------------------- process memory


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (chapter 1)."""
    hwm = _proc_status_kib("VmHWM")  # Linux; resettable through /proc/self/clear_refs
    if hwm is not None:
        return hwm * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes (chapter 1)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _as_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    return device


def peak_memory(device: torch.device | str | None = None) -> int:
    """Peak bytes: CUDA max allocated on a GPU, process peak RSS on a CPU (chapter 1)."""
    device = _as_device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


peak_memory_bytes = peak_memory  # the name used in the common brief


def reset_peak_memory(device: torch.device | str | None = None) -> bool:
    """Reset the peak counter; True if it was reset (on a CPU only Linux allows it) (chapter 1)."""
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _glibc():
    """glibc through ctypes, or None (not Linux, or a libc without malloc_trim, e.g. musl)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (AttributeError if missing)
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> bool:
    """Give the pages of freed heap blocks back to the OS (glibc's ``malloc_trim``) (chapter 6).

    glibc keeps freed blocks for reuse, and their pages stay resident: after a training run the
    process's RSS stays high, and a later block that reuses them looks as if it needed nothing.
    After this call those pages are counted again only when something touches them. True if it
    ran (Linux with glibc); elsewhere False, and nothing changes.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class MemorySampler:
    """Peak memory of a block above its start: ``with MemorySampler(device) as m: ...`` (chapter 1).

    On CUDA: the allocator's counters (exact for tensors). On CPU: freed heap pages are given back
    first (``release_free_memory``), then a thread samples the process RSS every ``interval_s``
    seconds, and where the kernel lets us reset the peak RSS (Linux), the kernel's own peak is
    used too, so short spikes between samples are not missed. Afterwards
    ``delta_bytes`` (alias ``increase_bytes``) = peak - start; ``method`` says how it was measured.
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.005,
                 reset_peak: bool = True):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s}")
        self.device = _as_device(device)
        self.interval_s = interval_s
        self.reset_peak = reset_peak  # CPU: also use the kernel's peak RSS when it can be reset
        self.method = ""  # "cuda_max_allocated", "rss_peak_reset" or "rss_sampling"
        self.start_bytes = 0  # allocated (CUDA) or RSS (CPU) when the block started
        self.peak_bytes = 0  # highest value during the block
        self.end_bytes = 0  # value when the block ended
        self.n_samples = 0  # RSS samples taken (CPU)
        self.released = False  # CPU: freed heap pages were given back before the start (glibc)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_bytes(self) -> int:
        """Peak during the block minus the start: what the block needed on top."""
        return self.peak_bytes - self.start_bytes

    increase_bytes = delta_bytes

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
        self.n_samples += 1

    def start(self) -> MemorySampler:
        """Reset the counters and start measuring."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_allocated"
            self.start_bytes = self.peak_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        self.released = release_free_memory()  # else reused free blocks would go uncounted
        was_reset = self.reset_peak and reset_peak_memory(self.device)
        self.method = "rss_peak_reset" if was_reset else "rss_sampling"
        self.start_bytes = self.peak_bytes = current_rss_bytes()
        self.n_samples = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> MemorySampler:
        """Stop measuring; fills ``peak_bytes`` and ``end_bytes``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.end_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()  # one last sample, after the block
        if self.method == "rss_peak_reset":
            self.peak_bytes = max(self.peak_bytes, peak_rss_bytes())
        self.end_bytes = current_rss_bytes()
        return self

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def track_memory(device: torch.device | str | None = None,
                 interval_s: float = 0.005) -> Iterator[MemorySampler]:
    """``with track_memory(device) as m:`` ... ``m.delta_bytes``: a MemorySampler as a block (chapter 1)."""
    sampler = MemorySampler(device, interval_s)
    with sampler:
        yield sampler


# ----------------------------------------------------------------------------- estimates

# Optimizer state bytes per trainable parameter (fp32 states).
OPTIMIZER_STATE_BYTES = {
    "adamw": 8,  # exp_avg + exp_avg_sq, 4 bytes each
    "adam": 8,
    "sgd_momentum": 4,  # one momentum buffer
    "sgd": 0,  # plain SGD keeps no state
}


def training_memory_estimate(n_params: int, n_trainable: int, weight_bytes: float = 4,
                             grad_bytes: float = 4, optimizer: str = "adamw",
                             master_weights: bool = False) -> dict:
    """Closed-form training bytes: weights, gradients, optimizer state (chapters 1 and 6).

    fp32 full fine-tuning with AdamW: 4 + 4 + 8 = 16 bytes per parameter. Mixed precision
    (``weight_bytes=2, grad_bytes=2, master_weights=True``): 2 + 2 + 4 (fp32 master) + 8 = 16.
    ``weight_bytes`` may be fractional (NF4 with double quantization: ~0.516 bytes). Activations,
    the CUDA context and allocator overhead are not included.
    """
    if not isinstance(n_params, int) or n_params < 0:
        raise ValueError(f"n_params must be an integer >= 0, got {n_params!r}")
    if not isinstance(n_trainable, int) or not 0 <= n_trainable <= n_params:
        raise ValueError(f"n_trainable must be an integer in [0, n_params={n_params}], "
                         f"got {n_trainable!r}")
    if weight_bytes <= 0 or grad_bytes <= 0:
        raise ValueError(f"weight_bytes and grad_bytes must be > 0, got {weight_bytes}, {grad_bytes}")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    out = {
        "weights": round(n_params * weight_bytes),
        "gradients": round(n_trainable * grad_bytes),
        "optimizer": n_trainable * OPTIMIZER_STATE_BYTES[optimizer],
        "master_weights": n_trainable * 4 if master_weights else 0,
    }
    out["total"] = sum(out.values())
    out["bytes_per_param"] = out["total"] / n_params if n_params else 0.0
    return out


def format_bytes(n: float) -> str:
    """Human-readable bytes in binary units: 1536 -> '1.50 KiB' (chapter 1)."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{sign}{n:.0f} B" if i == 0 else f"{sign}{n:.2f} {units[i]}"


# ----------------------------------------------------------------------------- LoRA code speed

LORA_SPEED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shaped_lm(arch: str = "SmolLM2-135M", layers: int | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM of a published shape, for timing only (chapter 7).

    ``arch`` is a key of ``lorabook.qlora.ARCHITECTURES``; ``layers`` keeps only the first that
    many blocks (a smaller model of the same widths). Time does not depend on the weights' values,
    so no file is needed. Eval mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorabook.qlora import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    a = ARCHITECTURES[arch]
    if layers is not None and (not isinstance(layers, int) or not 1 <= layers <= a.layers):
        raise ValueError(f"layers must be an integer in [1, {a.layers}], got {layers!r}")
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=layers or a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, tie_word_embeddings=a.tied)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(_as_device(device), dtype).eval()


def train_step(model: nn.Module, batch: dict[str, torch.Tensor],
               lr: float = 1e-4) -> Callable[[], torch.Tensor]:
    """One training step as a callable: forward with labels, backward, AdamW step (chapter 7).

    The AdamW optimizer over the parameters that require grad is made once, here; each call
    zeroes the gradients, runs ``model(**batch).loss.backward()`` (a causal LM's output layer only
    on the positions that predict a target, as in ``train.train``) and ``optimizer.step()``, and
    returns the loss tensor (detached; not ``.item()``, which would wait for a GPU). ``batch``
    must hold ``labels`` (the model computes its own loss).
    """
    if "labels" not in batch:
        raise ValueError(f"batch must hold 'labels' for the loss, got keys {sorted(batch)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    opt = torch.optim.AdamW(params, lr=lr)
    batch = skip_prompt_logits(model, batch)  # as train() does: no output layer on the prompt

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _forward(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def fn():
        with torch.inference_mode():
            return model(input_ids=ids)
    return fn


def compare_lora_speed(base: nn.Module, r: int = 8, alpha: float = 16,
                       targets: tuple[str, ...] | list[str] = LORA_SPEED_TARGETS,
                       batch_size: int = 8, seq_len: int = 128,
                       forward_shapes: tuple[tuple[int, int], ...] = ((1, 128), (8, 128)),
                       warmup: int = 2, repeats: int = 10, lr: float = 1e-4,
                       seed: int = 0) -> dict:
    """Our LoRALinear against peft's LoRA, and merged/unmerged against the base, interleaved (chapter 7).

    From one causal LM ``base`` (left untouched): ``lorabook`` (``apply_lora``) and ``peft``
    (``get_peft_model``) with the same A and B (B made non-zero), the same targets, r and alpha.
    Returns ``train_step``: {"peft", "lorabook"} (forward + backward + AdamW step on one random
    (batch_size, seq_len) batch, ratio to peft); ``forward``: {"BxT": {"base", "merged",
    "unmerged"}} (inference latency, ratio to base); ``parity``: max |logits ours - peft| and
    max |logits merged - unmerged| on the training batch (they must compute the same function).
    """
    import copy

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from lorabook.lora import apply_lora, lora_layers, lora_state_dict, merge_lora

    if not isinstance(base, nn.Module) or not hasattr(base, "config"):
        raise TypeError(f"base must be a transformers causal LM, got {type(base).__name__}")
    shapes = [(batch_size, seq_len), *forward_shapes]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for s in shapes for v in s):
        raise ValueError(f"batch sizes and sequence lengths must be integers >= 1, got {shapes}")
    device = next(base.parameters()).device
    g = torch.Generator().manual_seed(seed)
    vocab = base.config.vocab_size

    def random_ids(b: int, t: int) -> torch.Tensor:
        return torch.randint(0, vocab, (b, t), generator=g).to(device)  # (B, T)

    ids = random_ids(batch_size, seq_len)
    batch = {"input_ids": ids, "labels": ids}
    torch.manual_seed(seed)
    ours = apply_lora(copy.deepcopy(base), list(targets), r=r, alpha=alpha)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():  # B = 0 makes every adapter a no-op: give it something to compute
        for _, layer in lora_layers(ours):
            layer.B.normal_(0.0, 0.01, generator=gen)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                            target_modules=list(targets)))
    loaded = set_peft_model_state_dict(theirs, lora_state_dict(ours))
    if loaded.unexpected_keys:
        raise RuntimeError(f"peft did not take our adapter: {loaded.unexpected_keys[:3]}")
    ours.eval()
    theirs.eval()
    with torch.inference_mode():
        logits = ours(input_ids=ids).logits.float()  # (B, T, V)
        parity = {"max_abs_logit_diff_peft": (theirs(input_ids=ids).logits.float() - logits)
                  .abs().max().item()}
    ours.train()
    theirs.train()
    steps = {"peft": train_step(theirs, batch, lr), "lorabook": train_step(ours, batch, lr)}
    train_res = compare_latency(steps, "peft", warmup=warmup, repeats=repeats)
    del steps, theirs

    ours.eval()
    merged = merge_lora(copy.deepcopy(ours)).eval()
    with torch.inference_mode():
        parity["max_abs_logit_diff_merged"] = (merged(input_ids=ids).logits.float()
                                               - ours(input_ids=ids).logits.float()).abs().max().item()
    forward = {}
    for b, t in forward_shapes:
        x = random_ids(b, t)
        fns = {"base": _forward(base.eval(), x), "merged": _forward(merged, x),
               "unmerged": _forward(ours, x)}
        forward[f"{b}x{t}"] = compare_latency(fns, "base", warmup=warmup, repeats=repeats)
    return {"train_step": train_res, "forward": forward, "parity": parity,
            "config": {"r": r, "alpha": alpha, "targets": list(targets), "batch_size": batch_size,
                       "seq_len": seq_len, "forward_shapes": [list(s) for s in forward_shapes],
                       "warmup": warmup, "repeats": repeats, "device": str(device),
                       "dtype": str(next(base.parameters()).dtype).replace("torch.", "")}}


def lora_speed_as_dict(result: dict, samples: bool = False) -> dict:
    """``compare_lora_speed``'s result with every LatencyResult as a plain dict, JSON-ready (chapter 7)."""
    return {"train_step": {k: v.as_dict(samples) for k, v in result["train_step"].items()},
            "forward": {shape: {k: v.as_dict(samples) for k, v in res.items()}
                        for shape, res in result["forward"].items()},
            "parity": dict(result["parity"]), "config": dict(result["config"])}
