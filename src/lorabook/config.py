"""Run settings, device and dtype: chosen in one place for every chapter (chapter 1).

One environment variable, ``LORABOOK_MODE``, picks the run setting:

- ``fast``: the CI setting. Fewer steps and examples, smaller grids, the same code paths.
- ``cpu``:  the full CPU setting that the rendered book shows (default without CUDA).
- ``gpu``:  a larger setting (default when CUDA is present, e.g. on Colab).
- ``record``: the runs of record (``lorabook.record``): sized so that the methods converge; made
  once on a GPU (or in hours on a CPU), stored in ``benchmarks/results/``, read by the book.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

import torch

MODE_ENV = "LORABOOK_MODE"
MODES = ("fast", "cpu", "gpu", "record")


@dataclass(frozen=True)
class RunSettings:
    """How much work a chapter does; the same code paths in every mode (chapter 1)."""

    mode: str  # "fast" (CI), "cpu" (the rendered book) or "gpu"
    train_steps: int  # optimiser steps for one fine-tuning run on the causal LM
    batch_size: int  # sequences per optimiser step
    n_train: int  # generated training examples per task
    n_eval: int  # held-out examples scored by generation
    encoder_steps: int  # optimiser steps for one encoder (classification) run
    encoder_train: int  # labelled sentences used to train the encoder
    encoder_eval: int  # labelled sentences used to evaluate the encoder
    latency_repeats: int  # timed repeats per latency measurement (median reported)
    seeds: int  # seeds per configuration in sweeps


_SETTINGS = {
    "fast": RunSettings("fast", train_steps=4, batch_size=4, n_train=48, n_eval=8,
                        encoder_steps=8, encoder_train=256, encoder_eval=128,
                        latency_repeats=3, seeds=1),
    # cpu: sized for `make book`'s 20-minute budget on 2 cores (README). Steps of 2 sequences: on
    # the loan task 32 of them scored as 24 steps of 4 (LoRA, 32 held-out examples: exact match
    # 0.125 both) at two thirds of the cost; 24 steps of 2 reach valid JSON 0.97 and exact match
    # 0.06 (held-out loss 0.28 against 0.22), 16 steps of 4 exact match 0.04 (LoRA) and 0.00 (full
    # fine-tuning). The encoder at 24 steps: full fine-tuning 0.715, the subspace d = 100,000 0.667
    # (32 steps: 0.767, 0.705). The stored sweeps (benchmarks/results/*_cpu.jsonl) were made with
    # the larger cpu setting of commit 1d26bf0 (40 LM steps of 8, n_eval 40, 80 encoder steps, 500
    # test sentences), which their first line records.
    "cpu": RunSettings("cpu", train_steps=24, batch_size=2, n_train=600, n_eval=16,
                       encoder_steps=24, encoder_train=2000, encoder_eval=400,
                       latency_repeats=5, seeds=2),
    "gpu": RunSettings("gpu", train_steps=400, batch_size=16, n_train=4000, n_eval=200,
                       encoder_steps=600, encoder_train=8000, encoder_eval=2000,
                       latency_repeats=30, seeds=3),
    # record: the runs that decide the talk's claims (lorabook.record). 300 LM steps of 16 (4,800
    # examples, 1.2 epochs of 4,000) and 500 encoder steps of 16; scored on 256 held-out
    # messages (unseen templates) and 2,000 review sentences (unseen movies); 5 seeds.
    "record": RunSettings("record", train_steps=300, batch_size=16, n_train=4000, n_eval=256,
                          encoder_steps=500, encoder_train=8000, encoder_eval=2000,
                          latency_repeats=30, seeds=5),
}


def get_device() -> torch.device:
    """CUDA when present, else CPU (chapter 1)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_dtype(device: torch.device | None = None) -> torch.dtype:
    """Training dtype for the base weights: bf16 on a GPU that supports it, fp32 on CPU (chapter 1)."""
    device = device or get_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def get_settings(mode: str | None = None) -> RunSettings:
    """The run setting named by ``mode`` or ``$LORABOOK_MODE``; default gpu/cpu by device (chapter 1)."""
    mode = mode or os.environ.get(MODE_ENV) or ("gpu" if torch.cuda.is_available() else "cpu")
    mode = mode.strip().lower()
    if mode not in _SETTINGS:
        raise ValueError(f"{MODE_ENV}={mode!r} is not a run setting; expected one of {MODES}")
    return _SETTINGS[mode]


def describe() -> dict:
    """Versions, device, dtype and run setting: what every chapter's first cell shows (chapter 1)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:  # without importing it (peft's import alone takes seconds)
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    device = get_device()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "peft": installed("peft"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(get_dtype(device)).replace("torch.", ""),
    }
    info.update({f"setting.{k}": v for k, v in asdict(get_settings()).items()})
    return info


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run (chapter 1)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
