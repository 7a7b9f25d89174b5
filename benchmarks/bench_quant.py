"""Time lorabook.quant against bitsandbytes on one weight matrix (chapter 5).

    .venv/bin/python benchmarks/bench_quant.py [--size 4096] [--repeats 15]

Both sides quantize (and dequantize) the same tensor; the calls alternate, ours then theirs,
so a machine shared with other work slows both alike. Each row gives the median of the
repeats and the ratio ours / bitsandbytes (below 1.0: ours is faster). Before timing, the
outputs are checked to be identical, so the two sides do the same work.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch


def cpu_name() -> str:
    """The CPU model (``experiments.cpu_identity``)."""
    from lorabook.experiments import cpu_identity

    return cpu_identity()["cpu_model"]


def time_pair(ours, theirs, repeats: int, warmup: int) -> tuple[float, float]:
    """Median seconds of two callables, run alternately."""
    for _ in range(warmup):
        ours()
        theirs()
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs()
        t_theirs.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_theirs)


def time_one(W: torch.Tensor, bs: int, dq: bool, repeats: int, warmup: int):
    """(operation, our median s, bnb median s) for quantize and dequantize of W."""
    import bitsandbytes.functional as BF

    from lorabook.quant import dequantize_nf4, quantize_nf4

    def ours_q():
        return quantize_nf4(W, bs, double_quant=dq)

    def bnb_q():
        return BF.quantize_4bit(W, blocksize=bs, quant_type="nf4", compress_statistics=dq)

    packed, state = ours_q()
    bpacked, bstate = bnb_q()

    def ours_d():
        return dequantize_nf4(packed, state)

    def bnb_d():
        return BF.dequantize_4bit(bpacked, bstate, quant_type="nf4")

    if not (torch.equal(packed, bpacked) and torch.equal(ours_d(), bnb_d())):
        raise RuntimeError("outputs differ from bitsandbytes: the timings would not compare")
    return [("quantize", *time_pair(ours_q, bnb_q, repeats, warmup)),
            ("dequantize", *time_pair(ours_d, bnb_d, repeats, warmup))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    import bitsandbytes as bnb

    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch threads "
          f"{torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"bitsandbytes {bnb.__version__}")
    print(f"W: {args.size} x {args.size}, NF4, blocksize {args.blocksize}, "
          f"median of {args.repeats} alternating runs after {args.warmup} warm-up\n")
    print(f"{'operation':<34}{'ours ms':>10}{'bnb ms':>10}{'ours/bnb':>10}")

    torch.manual_seed(0)
    for name in args.dtypes.split(","):
        W = torch.randn(args.size, args.size).to(getattr(torch, name))
        for dq in (False, True):
            label = f"{name}{' + DQ' if dq else ''}"
            for op, t_ours, t_bnb in time_one(W, args.blocksize, dq, args.repeats, args.warmup):
                print(f"{op + ' ' + label:<34}{1e3 * t_ours:>10.1f}{1e3 * t_bnb:>10.1f}"
                      f"{t_ours / t_bnb:>9.2f}x")


if __name__ == "__main__":
    main()
