"""Is bf16 autocast worth it on this machine? fp32 against bf16 matmuls of one SmolLM2 layer (chapter 4).

    .venv/bin/python benchmarks/bench_bf16.py [--repeats 10] [--threads 2]

The runs of record train with bf16 autocast (``--mixed-precision``) because the CPU that made
them has AMX, where a bf16 matmul is several times faster than an fp32 one. A CPU with only AVX2
has no bf16 arithmetic: there torch's bf16 matmuls run far slower than fp32, and a run of record
would take hours. Run this before starting runs of record on a new machine. The shapes are one
MLP projection (576 -> 1536) on a batch of 16 x 96 tokens: the forward ``F.linear(x, W)``, and
the input gradient ``grad @ W`` as the 4-bit path's backward computes it (W dequantized, (out, in))
and with W transposed to contiguous (in, out) first. The calls alternate (``bench.compare_latency``), so a busy
machine slows all of them alike; each row gives the median and the ratio to fp32.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lorabook.bench import compare_latency
from lorabook.experiments import cpu_identity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 96, 576, generator=gen)  # (batch, tokens, in)
    g = torch.randn(16, 96, 1536, generator=gen)  # the output's gradient (batch, tokens, out)
    W = torch.randn(1536, 576, generator=gen) / 24  # (out, in)
    xb, gb, Wb = x.bfloat16(), g.bfloat16(), W.bfloat16()
    groups = [
        {"forward, fp32": lambda: F.linear(x, W), "forward, bf16": lambda: F.linear(xb, Wb)},
        {"input gradient grad @ W, fp32": lambda: g @ W,
         "input gradient grad @ W, bf16": lambda: gb @ Wb,
         "input gradient, W as contiguous (in, out), bf16": lambda: F.linear(gb, Wb.t().contiguous())},
    ]
    cpu = cpu_identity()
    print(f"CPU: {cpu['cpu_model']} (torch uses {cpu['cpu_capability']}), {args.threads} threads, "
          f"torch {torch.__version__}")
    for fns in groups:  # each group timed round-robin against its fp32 call
        for name, res in compare_latency(fns, baseline=next(iter(fns)), warmup=1,
                                         repeats=args.repeats).items():
            print(f"{name:50s} {1e3 * res.median_s:9.2f} ms   x{res.ratio:.2f} of fp32")


if __name__ == "__main__":
    main()
