"""One side of tests/test_distributed.py: the same tiny runs, as one process or as one of several.

Run under ``torchrun --nproc_per_node 2 tests/_distributed_worker.py OUT [CLI ARGS]``: every run
of ``RUNS`` trains on two processes (DDP through accelerate for LoRA and full fine-tuning; FSDP2
for full fine-tuning) and process 0 saves the losses and final trainable weights to OUT. With CLI
ARGS, ``python -m lorabook.train``'s ``main`` then runs with them, each process given its own
``--out`` (``out_rank0``, ``out_rank1`` in the working folder), so that a write by process 1 shows.
The test imports ``run`` to make the single-process references in its own process.
"""

from __future__ import annotations

import sys

import torch

from lorabook.distributed import FSDPProcess, get_accelerator
from lorabook.lora import apply_lora
from lorabook.train import TrainConfig, train

VOCAB, PAD = 128, 0
PER_PROCESS_BATCH = 2  # b: two processes with b = 2 against one process with 2b = 4


def tiny_llama() -> torch.nn.Module:
    """The 2-block Llama of tests/conftest.py (same config, same seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def items(n: int = 24) -> list[dict]:
    """Prompt + reply sequences of different lengths; only the reply is a target (label != -100).

    Different lengths give the two halves of a batch different numbers of target tokens, which is
    what ``distributed.loss_weight`` must correct for.
    """
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        prompt, reply = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (prompt + reply,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def collate(batch: list[dict]) -> dict:
    """Right-padded (B, T) tensors, as lorabook.data.collate_causal."""
    from lorabook.data import collate_causal

    return collate_causal(batch, PAD)


def run(method: str, batch_size: int, accumulation: int = 1, accelerator=None, steps: int = 4) -> dict:
    """Train ``method`` ("lora" or "full") on the tiny Llama; losses and trainable weights."""
    model = tiny_llama()
    if method == "lora":
        torch.manual_seed(0)
        apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    cfg = TrainConfig(steps=steps, lr=1e-2 if method == "lora" else 1e-3, batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, warmup_steps=1, max_grad_norm=1.0,
                      progress=False, seed=3)
    hist = train(model, items(), cfg, collate, accelerator=accelerator)
    if accelerator is not None and hasattr(accelerator, "get_state_dict"):
        state = accelerator.get_state_dict(model)  # gathered from FSDP's shards / DDP's wrapper
    else:
        state = model.state_dict()
    names = [n for n, p in model.named_parameters() if p.requires_grad and n in state]  # main: all
    return {"loss": hist.loss, "tokens": hist.tokens,
            "weights": {n: state[n].detach().clone() for n in names}}


RUNS = {"lora_ddp": ("lora", "ddp"), "full_ddp": ("full", "ddp"), "full_fsdp": ("full", "fsdp")}

if __name__ == "__main__":
    out = {}
    acc = get_accelerator()  # accelerate's Accelerator (CPU, gloo) under torchrun
    for name, (method, kind) in RUNS.items():
        runner = acc if kind == "ddp" else FSDPProcess()
        out[name] = run(method, PER_PROCESS_BATCH, accelerator=runner)
    if acc.is_main_process:
        torch.save(out, sys.argv[1])
    if len(sys.argv) > 2:  # then the command line, each process given its own --out (the writes test)
        import os

        from lorabook.launch import main

        main([*sys.argv[2:], "--out", os.path.join(os.getcwd(), "out_rank" + os.environ["RANK"])])
