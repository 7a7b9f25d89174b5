"""Inference latency of adapter layers (and a prefix) against the plain model: LoRA Table 1 in miniature.

The LoRA paper (Hu et al. 2021, Table 1, GPT-2 medium) measured adapter layers adding +20-30% at
batch 1 x 128 tokens and +2-3% at batch 32 x 512. This script times, interleaved round by round,
the base model, Adapter-H (two adapters per block), Adapter-L (one, after the MLP) and prefix
tuning, and prints each median as a ratio to the base model.

    python benchmarks/bench_adapters.py                      # SmolLM2-135M's shape, random weights
    python benchmarks/bench_adapters.py --model default      # the book's offline SmolLM2 model
    python benchmarks/bench_adapters.py --shapes 1x128,32x512 --dtype bfloat16 --device cuda

Latency does not depend on the weights' values, so the default builds a randomly initialised model
of SmolLM2-135M's shape (no files needed).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from lorabook import bench
from lorabook.baselines import PrefixTuning, add_adapters

SMOLLM2_135M = dict(  # LlamaForCausalLM, as in REFERENCE.md
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """The base model: SmolLM2-135M's shape with random weights, 'default', or a path/hub id."""
    if name == "smollm2-shape":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device, dtype).eval()
    from lorabook.models import load_lm

    model, _ = load_lm(None if name == "default" else name, dtype=dtype, device=device)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-shape")
    p.add_argument("--shapes", default="1x128,8x128", help="batch x tokens, comma-separated")
    p.add_argument("--bottleneck", type=int, default=64)
    p.add_argument("--n-prefix", type=int, default=32, help="0 leaves prefix tuning out")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = build_model(args.model, device, dtype)
    variants = {"base": base,
                "adapter-H": add_adapters(copy.deepcopy(base), args.bottleneck, "houlsby"),
                "adapter-L": add_adapters(copy.deepcopy(base), args.bottleneck, "lin")}
    if args.n_prefix:
        variants[f"prefix-{args.n_prefix}"] = PrefixTuning(base, args.n_prefix).eval()
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model {args.model}: {n_params / 1e6:.1f}M params, {device}, {args.dtype}, "
          f"bottleneck {args.bottleneck}, median of {args.repeats} interleaved rounds")

    out = {}
    for shape in args.shapes.split(","):
        batch, tokens = (int(v) for v in shape.lower().split("x"))
        ids = torch.randint(3, base.config.vocab_size, (batch, tokens), device=device)

        def forward(model, ids=ids):
            with torch.inference_mode():
                model(input_ids=ids)

        fns = {name: (lambda m=m: forward(m)) for name, m in variants.items()}
        res = bench.compare_latency(fns, baseline="base", warmup=args.warmup, repeats=args.repeats)
        out[shape] = {name: r.as_dict() for name, r in res.items()}
        print(f"\nbatch {batch} x {tokens} tokens")
        for name, r in res.items():
            spread = f"  per-round ratio p10-p90 {r.ratio_p10:.3f}-{r.ratio_p90:.3f}" \
                if name != "base" else ""
            print(f"  {name:<12} {r.median_s * 1e3:9.2f} ms  ratio {r.ratio:.3f}{spread}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
