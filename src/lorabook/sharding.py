"""What sharding buys: per-process memory of training, computed and measured (chapter 9).

Full fine-tuning keeps, per parameter, the weight, its gradient and AdamW's two moments: 4 + 4 + 8
bytes in fp32 (chapter 6's ``qlora.memory_budget``). Data parallelism (DDP) copies all of it to
every process. FSDP "full shard" (ZeRO-3) cuts each of the three into P slices, one per process,
and gathers a layer's weights only while that layer runs. So per process:

- DDP:  params + grads + optimizer                      (no saving, more processes only go faster)
- FSDP: (params + grads + optimizer) / P + one layer's gathered weights and gradients

``per_gpu_budget`` extends chapter 6's table to P GPUs. ``measure`` runs a few steps of full
fine-tuning through ``train.train`` and reports what this process holds (tensor bytes, exact) and
its resident memory (RSS: includes Python, torch and the activations). Its command line is

    torchrun --standalone --nproc_per_node 2 -m lorabook.sharding --out memory.json [--fsdp]

on CPU processes (``accelerate launch --cpu`` starts only one), and on GPUs
``accelerate launch --num_processes 2 [--use_fsdp --fsdp_version 2 ...] -m lorabook.sharding``;
``command`` writes either, and the chapter runs the CPU one for each of its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from lorabook import bench, qlora
from lorabook.distributed import get_accelerator, is_fsdp, training_state_bytes
from lorabook.qlora import Architecture

# Larger Llama-style models a reader may fine-tune on several GPUs (chapter 9), from each model's
# published config.json on the Hugging Face hub (chapter 6's qlora.ARCHITECTURES has 135M to 7B).
LARGE_ARCHITECTURES = {a.name: a for a in [
    qlora.ARCHITECTURES["Llama-2-7B"],
    Architecture("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False,
                 qlora._HUB.format("meta-llama/Llama-3.1-8B")),
    Architecture("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000, False,
                 qlora._HUB.format("meta-llama/Llama-2-13b-hf")),
    Architecture("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000, False,
                 qlora._HUB.format("meta-llama/Llama-2-70b-hf")),
    Architecture("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False,
                 qlora._HUB.format("meta-llama/Llama-3.1-70B")),
]}


def per_gpu_budget(arch: Architecture, method: str, gpus: int, sharded: bool = True,
                   r: int = 8, weight_bytes: float = 2) -> dict:
    """Bytes per GPU of weights, gradients, master weights and AdamW state on ``gpus`` GPUs (chapter 9).

    ``qlora.memory_budget`` for one GPU, divided by ``gpus`` when ``sharded`` (FSDP full shard /
    ZeRO-3: every one of the four is cut in P slices), copied whole when not (DDP). A sharded run
    also holds one block's gathered weights and gradients at a time (the largest block, in
    ``weight_bytes``; 4-bit blocks of QLoRA counted as stored), included as ``gathered``.
    Activations, the CUDA context and communication buffers are not included.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    one = qlora.memory_budget(arch, method, r=r, weight_bytes=weight_bytes)
    keys = ("weights", "gradients", "master_weights", "optimizer")
    share = gpus if sharded else 1
    out = {"model": arch.name, "method": method, "gpus": gpus, "sharded": sharded,
           **{k: one[k] / share for k in keys}}
    block = sum(o * i for o, i in arch.linear_shapes().values())  # parameters of one block
    if sharded and gpus > 1:
        grads = block * weight_bytes if method == "full" else 0
        weights = (block * weight_bytes if method != "qlora"
                   else sum(qlora.nf4_bytes(o * i) for o, i in arch.linear_shapes().values()))
        out["gathered"] = (weights + grads) * (gpus - 1) / gpus
    else:
        out["gathered"] = 0.0
    out["total"] = sum(out[k] for k in (*keys, "gathered"))
    return out


def budget_table(architectures: Sequence[Architecture] | None = None,
                 methods: Sequence[str] = ("full", "lora", "qlora"),
                 gpus: Sequence[int] = (1, 2, 4, 8), r: int = 8) -> list[dict]:
    """``per_gpu_budget`` (FSDP-sharded) for each model, method and GPU count, in GiB (chapter 9)."""
    archs = list(LARGE_ARCHITECTURES.values()) if architectures is None else list(architectures)
    rows = []
    for arch in archs:
        for method in methods:
            row = {"model": arch.name, "method": method,
                   "params (B)": qlora.parameter_counts(arch)["total"] / 1e9}
            for g in gpus:
                row[f"{g} GPU" + ("s" if g > 1 else "")] = per_gpu_budget(arch, method, g, r=r)["total"] / 2**30
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- measured


def _gather(obj) -> list:
    """``obj`` from every process, in process order (one process: [obj])."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


METHODS = ("full", "lora", "qlora")


def measure(method: str = "full", arch: str = "SmolLM2-135M", layers: int | None = None,
            steps: int = 2, batch_size: int = 1, seq_len: int = 32, seed: int = 0,
            fsdp: bool | None = None) -> list[dict]:
    """Fine-tune a model of ``arch``'s shape for ``steps`` steps; each process's memory (chapter 9).

    ``method``: "full" (every weight trains), "lora" (chapter 3's adapter, r = 8 on every linear
    layer of the blocks) or "qlora" (the same on our NF4 base, chapter 6). The model is
    ``bench.shaped_lm`` (random weights: memory does not depend on their values) with ``layers``
    blocks; the batch is random tokens, the loss on every position. Run it plain, or under
    ``accelerate launch`` (DDP; FSDP with ``--use_fsdp``): it returns one row per process with the
    bytes of parameters, gradients, AdamW state and buffers this process holds after the last
    optimizer step (gradients not yet freed), its RSS then, and its peak RSS.
    """
    from lorabook.experiments import LORA_ALPHA, LORA_R, LORA_TARGETS
    from lorabook.lora import apply_lora
    from lorabook.train import TrainConfig, train

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    acc = get_accelerator(fsdp)
    model = bench.shaped_lm(arch, layers=layers, seed=seed).train()
    n_params = sum(p.numel() for p in model.parameters())
    if method == "lora":
        apply_lora(model, list(LORA_TARGETS), r=LORA_R, alpha=LORA_ALPHA)
    elif method == "qlora":
        qlora.qlora_model(model, r=LORA_R, alpha=LORA_ALPHA, targets=LORA_TARGETS)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    world = acc.num_processes
    items = [{"input_ids": torch.randint(0, vocab, (seq_len,), generator=g)}
             for _ in range(batch_size * world * 4)]

    def collate(batch):
        ids = torch.stack([it["input_ids"] for it in batch])  # (B, T)
        return {"input_ids": ids, "labels": ids.clone()}

    seen = {}

    def count(m, opt):  # after the last optimizer step, before zero_grad frees the gradients
        seen["state"] = training_state_bytes(m, opt)
        bench.release_free_memory()  # what the allocator holds free goes back to the system first
        seen["rss"] = bench.current_rss_bytes()

    cfg = TrainConfig(steps=steps, lr=1e-5 if method == "full" else 1e-3, batch_size=batch_size,
                      warmup_steps=1, seed=seed, progress=False, max_grad_norm=None)
    hist = train(model, items, cfg, collate, accelerator=acc if world > 1 else None, after_step=count)
    state = seen["state"]
    row = {"method": method, "process": acc.process_index, "processes": world,
           "fsdp": is_fsdp(acc),
           "arch": arch, "layers": model.config.num_hidden_layers, "model_params": n_params,
           **state, "training_state": sum(state.values()),
           "rss": seen["rss"], "peak_rss": bench.peak_rss_bytes(),
           "final_loss": hist.loss[-1]}
    return _gather(row)


def command(method: str = "full", processes: int = 1, fsdp: bool = False, layers: int | None = None,
            out: str | Path = "memory.json", launcher: str = "torchrun") -> list[str]:
    """The command that runs ``measure`` on ``processes`` CPU processes (chapter 9).

    ``launcher="torchrun"`` (what this CPU runs: accelerate's ``--cpu`` launches one process) or
    ``"accelerate"`` (the command for a machine with GPUs: ``--use_fsdp`` there is accelerate's own).
    """
    args = ["-m", "lorabook.sharding", "--method", method, "--out", str(out)]
    args += ["--layers", str(layers)] if layers else []
    if processes == 1:
        return [sys.executable, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes), *args, *(["--fsdp"] if fsdp else [])]
    if launcher == "accelerate":
        flags = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                 "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"] if fsdp else ["--multi_gpu"]
        return ["accelerate", "launch", *flags, "--num_processes", str(processes), *args]
    raise ValueError(f"launcher must be 'torchrun' or 'accelerate', got {launcher!r}")


def run_measurements(runs: Sequence[tuple[str, int, bool]], layers: int | None, folder: str | Path,
                     timeout_s: float = 900) -> list[dict]:
    """Run ``measure`` as (method, processes, fsdp) for each run, one after another; all rows (chapter 9).

    Each run is a fresh set of processes (``command`` with torchrun), so one run's memory does not
    linger in the next; the rows come back from the JSON file process 0 writes.
    """
    import subprocess

    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: two processes, two cores
    rows = []
    for i, (method, processes, fsdp) in enumerate(tqdm(list(runs), desc="measured runs")):
        out = folder / f"run{i}.json"
        cmd = command(method, processes, fsdp, layers, out)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        rows += json.loads(out.read_text())
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Command line: measure per-process memory of fine-tuning, write JSON (chapter 9)."""
    p = argparse.ArgumentParser(prog="python -m lorabook.sharding", description=main.__doc__)
    p.add_argument("--method", choices=METHODS, default="full")
    p.add_argument("--arch", default="SmolLM2-135M", help="a key of lorabook.qlora.ARCHITECTURES")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--out", type=Path, required=True, help="JSON file (written by process 0)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard with FSDP2 (as `accelerate launch --use_fsdp` asks)")
    args = p.parse_args(argv)
    rows = measure(args.method, args.arch, args.layers, args.steps, seq_len=args.seq_len,
                   fsdp=args.fsdp or None)
    if int(os.environ.get("RANK", "0")) == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
