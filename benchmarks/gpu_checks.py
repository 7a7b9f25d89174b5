"""GPU-only checks and side-by-side timings, for a machine with CUDA (never part of the test suite).

    python benchmarks/gpu_checks.py --json gpu_checks.json

1. NF4 on CUDA: our quantizer against bitsandbytes' CUDA kernels on the same tensors (packed bytes,
   absmax, dequantized values; with double quantization, how many 8-bit absmax codes differ: the
   CUDA kernel rounds to the nearest code, the CPU one through a binned table).
2. LinearNF4 against bnb.nn.Linear4bit on CUDA (same packed weight, same output).
3. The training loop on CUDA with paged AdamW (bitsandbytes) on a small Llama.
4. Step time of our LoRALinear against peft's LoRA on a model of SmolLM2-135M's shape (bf16,
   forward + backward + AdamW step, interleaved), and the merged and unmerged models' forward
   latency against the base: ``lorabook.bench.compare_lora_speed``, which
   benchmarks/bench_lora.py also runs (on a CPU too).
Every number is printed as a ratio measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch


def nf4_checks(device: torch.device) -> dict:
    import bitsandbytes.functional as F

    from lorabook.quant import dequantize_nf4, quantize_nf4

    out = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for blocksize in (64, 128, 4096):
            W = torch.randn(1024, 1000, generator=g).to(device, dtype)
            for dq in (False, True):
                packed, state = quantize_nf4(W, blocksize=blocksize, double_quant=dq)
                bp, bs = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=dq)
                key = f"{str(dtype)[6:]}_bs{blocksize}_dq{int(dq)}"
                row = {"packed_bytes_differing": int((packed.view(-1) != bp.view(-1)).sum())}
                if dq:
                    row["absmax_codes_differing"] = int((state.absmax.view(-1) != bs.absmax.view(-1)).sum())
                    row["absmax_codes"] = int(bs.absmax.numel())
                    row["offset_equal"] = bool(torch.equal(state.offset.view(-1).float(),
                                                           bs.offset.view(-1).float()))
                else:
                    row["absmax_equal"] = bool(torch.equal(state.absmax.float(), bs.absmax.float()))
                ours = dequantize_nf4(packed, state)
                theirs = F.dequantize_4bit(bp, bs)
                row["dequant_max_abs_diff"] = float((ours.float() - theirs.float()).abs().max())
                out[key] = row
    return out


def linear4bit_check(device: torch.device) -> dict:
    import bitsandbytes as bnb

    from lorabook.quant import LinearNF4

    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 1536, bias=False).to(device)
    ours = LinearNF4.from_linear(lin, blocksize=64, double_quant=False, quant_type="nf4")
    ref = bnb.nn.Linear4bit(576, 1536, bias=False, quant_type="nf4", compress_statistics=False,
                            compute_dtype=torch.float32)
    ref.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=False).to(device)
    x = torch.randn(8, 576, device=device)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    return {"linear_nf4_vs_bnb_max_abs_diff": diff}


def paged_adamw_check(device: torch.device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorabook.train import TrainConfig, train

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).to(device)
    items = [{"input_ids": list(range(s, s + 32))} for s in range(0, 64, 4)]

    def collate(batch):
        ids = torch.tensor([b["input_ids"] for b in batch])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    hist = train(model, items, TrainConfig(steps=30, lr=3e-3, batch_size=8, optimizer="paged_adamw",
                                           progress=False), collate)
    return {"paged_adamw_first_loss": hist.loss[0], "paged_adamw_last_loss": hist.loss[-1],
            "peak_memory_MB": hist.peak_memory_bytes / 2**20}


def lora_speed(device: torch.device, repeats: int) -> dict:
    """benchmarks/bench_lora.py's measurement (lorabook.bench.compare_lora_speed) in bf16 on CUDA."""
    from lorabook import bench

    base = bench.shaped_lm("SmolLM2-135M", device=device, dtype=torch.bfloat16)
    res = bench.compare_lora_speed(base, r=8, alpha=16, batch_size=8, seq_len=256,
                                   forward_shapes=((1, 128), (8, 256)), warmup=3, repeats=repeats)
    return bench.lora_speed_as_dict(res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_checks.py needs CUDA; on a CPU the test suite covers these paths")
    device = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "python": platform.python_version()}
    for name, fn in (("nf4", lambda: nf4_checks(device)), ("linear4bit", lambda: linear4bit_check(device)),
                     ("paged_adamw", lambda: paged_adamw_check(device)),
                     ("lora_speed", lambda: lora_speed(device, args.repeats))):
        try:
            results[name] = fn()
        except Exception as e:  # report every check, even when one fails
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, json.dumps(results[name], indent=1, default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
