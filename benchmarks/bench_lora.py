"""Speed of the book's LoRA code: our LoRALinear against peft's, and merging against the base model.

Three measurements, each interleaved round by round in this one run (``lorabook.bench``):

1. Train step (forward + backward + AdamW step) of a model with our ``LoRALinear`` against the same
   model with peft's LoRA: same base, batch, targets, r, alpha and adapter weights. Goal: ours
   within 10% of peft (ratio <= 1.10).
2. Forward latency of the merged model (W = W0 + delta_W) against the base. Goal: ratio 1.00 within
   the noise (the per-round p10-p90 range covers 1), LoRA's "no inference latency".
3. Forward latency of the unmerged model against the base, for contrast: the price of serving the
   adapter beside the weights.

    python benchmarks/bench_lora.py                        # SmolLM2-135M's shape, random weights
    python benchmarks/bench_lora.py --layers 4 --repeats 5 # a smaller, quicker model on a CPU
    python benchmarks/bench_lora.py --model default        # the book's offline SmolLM2 model
    python benchmarks/bench_lora.py --device cuda --dtype bfloat16 --json bench_lora.json

Time does not depend on the weights' values, so the default builds a randomly initialised model of
SmolLM2-135M's shape (``lorabook.bench.shaped_lm``; no files needed). benchmarks/gpu_checks.py runs
the same measurement in bf16 on CUDA.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from lorabook import bench
from lorabook.experiments import provenance

TRAIN_GOAL = 1.10  # ours / peft train step time: at most 10% slower


def build_model(name: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    """The base model: SmolLM2-135M's shape with random weights, 'default', or a path/hub id."""
    if name == "smollm2-shape":
        return bench.shaped_lm("SmolLM2-135M", layers=layers, device=device, dtype=dtype)
    if layers is not None:
        raise SystemExit("--layers only applies to --model smollm2-shape")
    from lorabook.models import load_lm

    model, _ = load_lm(None if name == "default" else name, dtype=dtype, device=device)
    return model.eval()


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, tokens = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxTOKENS such as 8x128, got {text!r}") from None
    return batch, tokens


def paired_ratio(r: bench.LatencyResult, baseline: bench.LatencyResult) -> float:
    """Median of the per-round ratios: each round times both variants back to back."""
    return float(np.median(np.asarray(r.samples_s) / np.asarray(baseline.samples_s)))


def _row(name: str, r: bench.LatencyResult, baseline: bench.LatencyResult) -> str:
    line = (f"  {name:<10} {r.median_s * 1e3:9.2f} ms  [p10 {r.p10_s * 1e3:8.2f}, "
            f"p90 {r.p90_s * 1e3:8.2f}]")
    if r is not baseline:
        line += (f"  ratio {paired_ratio(r, baseline):.3f} (per-round median; p10-p90 "
                 f"{r.ratio_p10:.3f}-{r.ratio_p90:.3f})")
    return line


def verdicts(result: dict) -> dict[str, str]:
    """One line per goal, computed from the per-round ratios."""
    train = result["train_step"]
    ratio = paired_ratio(train["lorabook"], train["peft"])
    met = "met" if ratio <= TRAIN_GOAL else "NOT met"
    out = {"train_step": f"lorabook / peft = {ratio:.3f} (goal <= {TRAIN_GOAL:.2f}): {met}"}
    for shape, res in result["forward"].items():
        m, u = res["merged"], res["unmerged"]
        noise = ("1.00 within the noise" if m.ratio_p10 <= 1.0 <= m.ratio_p90
                 else "1.00 outside the per-round p10-p90 range")
        out[f"forward {shape}"] = (f"merged / base = {paired_ratio(m, res['base']):.3f} (p10-p90 "
                                   f"{m.ratio_p10:.3f}-{m.ratio_p90:.3f}): {noise}; unmerged / "
                                   f"base = {paired_ratio(u, res['base']):.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-shape",
                   help="smollm2-shape (random weights), default (the book's model), or a path/hub id")
    p.add_argument("--layers", type=int, default=None,
                   help="keep only this many blocks of smollm2-shape (quicker on a CPU)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", default=",".join(bench.LORA_SPEED_TARGETS),
                   help="comma-separated linear layer names")
    p.add_argument("--train-shape", type=_shape, default=(8, 128), help="BATCHxTOKENS of a train step")
    p.add_argument("--shapes", default="1x128,8x128", help="BATCHxTOKENS of the forward passes, comma-separated")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", help="also write the results and their provenance to this file")
    args = p.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    shapes = tuple(_shape(s) for s in args.shapes.split(","))
    base = build_model(args.model, args.layers, device, dtype)
    n_params = sum(q.numel() for q in base.parameters())
    print(f"model {args.model}: {n_params / 1e6:.1f}M params, {base.config.num_hidden_layers} blocks, "
          f"{device}, {args.dtype}; LoRA r={args.r}, alpha={args.alpha:g} on "
          f"{','.join(t.removesuffix('_proj') for t in targets)}; median of {args.repeats} "
          f"interleaved rounds after {args.warmup} warm-up", flush=True)
    result = bench.compare_lora_speed(base, r=args.r, alpha=args.alpha, targets=targets,
                                      batch_size=args.train_shape[0], seq_len=args.train_shape[1],
                                      forward_shapes=shapes, warmup=args.warmup,
                                      repeats=args.repeats)
    parity = result["parity"]
    print(f"same function: max |logits ours - peft| = {parity['max_abs_logit_diff_peft']:.1e}, "
          f"max |logits merged - unmerged| = {parity['max_abs_logit_diff_merged']:.1e}")
    b, t = args.train_shape
    print(f"\n1. train step (forward + backward + AdamW), batch {b} x {t} tokens")
    for name, r in result["train_step"].items():
        print(_row(name, r, result["train_step"]["peft"]))
    for shape, res in result["forward"].items():
        print(f"\n2-3. forward, batch {shape.replace('x', ' x ')} tokens")
        for name, r in res.items():
            print(_row(name, r, res["base"]))
    lines = verdicts(result)
    print("\nverdicts")
    for name, line in lines.items():
        print(f"  {name}: {line}")
    if args.json:
        record = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                  "provenance": provenance({"n_params": n_params}),
                  "results": bench.lora_speed_as_dict(result), "verdicts": lines}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
