"""Chapter 9's arithmetic and glue, without launching processes (those are in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from lorabook import qlora, sharding
from lorabook.distributed import (
    LocalProcess,
    local_bytes,
    loss_items,
    loss_weight,
    shard,
    training_state_bytes,
)


def test_shard_cuts_a_global_batch_into_equal_micro_batches_in_order():
    batch = list(range(8))
    assert shard(batch, 0, 2, 2) == [[0, 1], [2, 3]]
    assert shard(batch, 1, 2, 2) == [[4, 5], [6, 7]]
    assert shard(batch, 0, 1) == [batch]
    with pytest.raises(ValueError, match="does not split"):
        shard(list(range(6)), 0, 4)
    with pytest.raises(ValueError, match="process_index"):
        shard(batch, 2, 2)


def test_loss_weights_make_the_global_mean():
    """sum over processes and micro-batches of mean_pm * weight_pm, averaged over P, is the global mean."""
    labels = torch.full((4, 6), -100)
    labels[0, 1:6] = 1  # 5 targets
    labels[1, 4:6] = 1  # 2
    labels[2, 2:6] = 1  # 4
    labels[3, 5] = 1  # 1
    per_token = torch.rand(4, 5)  # a loss per predicted position
    mask = labels[:, 1:] != -100
    global_mean = per_token[mask].mean()
    n = loss_items(labels, 4)
    assert n == 12
    halves = [(per_token[i:i + 2][mask[i:i + 2]].mean(), loss_items(labels[i:i + 2], 2)) for i in (0, 2)]
    averaged = sum(mean * loss_weight(k, n, 2) for mean, k in halves) / 2  # what DDP's average gives
    torch.testing.assert_close(averaged, global_mean)
    assert loss_weight(7, 7, 1) == 1.0  # one process, one micro-batch: unchanged
    assert loss_items(torch.tensor([0, 1, 1]), 3) == 3  # a classifier averages over rows
    with pytest.raises(ValueError, match="no loss terms"):
        loss_weight(0, 0, 2)


def test_training_state_bytes_counts_params_grads_and_adamw(tiny_llama):
    model = tiny_llama.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    got = training_state_bytes(model, opt)
    assert (got["parameters"], got["gradients"], got["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert local_bytes([None, torch.zeros(3, dtype=torch.float16)]) == 6
    assert LocalProcess().prepare(model) is model


def test_per_gpu_budget_divides_chapter_6s_budget():
    arch = qlora.ARCHITECTURES["Llama-2-7B"]
    one = qlora.memory_budget(arch, "full", weight_bytes=2)
    assert sharding.per_gpu_budget(arch, "full", 1)["total"] == one["total"]
    ddp = sharding.per_gpu_budget(arch, "full", 4, sharded=False)
    assert ddp["total"] == one["total"]  # DDP: every GPU holds everything
    fsdp = sharding.per_gpu_budget(arch, "full", 4)
    block = sum(o * i for o, i in arch.linear_shapes().values())
    assert fsdp["total"] == pytest.approx(one["total"] / 4 + 2 * block * 2 * 3 / 4)
    with pytest.raises(ValueError, match="gpus"):
        sharding.per_gpu_budget(arch, "full", 0)


def test_large_architectures_match_their_published_sizes():
    """Parameter counts from the configs against the models' names (7B, 8B, 13B, 70B)."""
    sizes = {n: qlora.parameter_counts(a)["total"] / 1e9 for n, a in sharding.LARGE_ARCHITECTURES.items()}
    assert sizes["Llama-2-7B"] == pytest.approx(6.74, abs=0.01)
    assert sizes["Llama-3.1-8B"] == pytest.approx(8.03, abs=0.01)
    assert sizes["Llama-2-13B"] == pytest.approx(13.02, abs=0.01)
    assert sizes["Llama-2-70B"] == pytest.approx(68.98, abs=0.01)
    assert sizes["Llama-3.1-70B"] == pytest.approx(70.55, abs=0.01)


def test_command_names_the_launcher():
    assert sharding.command("full", 1)[1:3] == ["-m", "lorabook.sharding"]
    two = sharding.command("full", 2, fsdp=True)
    assert "torch.distributed.run" in two and two[-1] == "--fsdp"
    assert sharding.command("full", 2, fsdp=True, launcher="accelerate")[:3] == ["accelerate", "launch", "--use_fsdp"]
    with pytest.raises(ValueError, match="launcher"):
        sharding.command("full", 2, launcher="mpirun")


def test_per_gpu_figure_has_a_panel_per_method():
    import pandas as pd

    from lorabook.viz import sharding_plots

    rows = pd.DataFrame(sharding.budget_table(gpus=(1, 2, 4))).to_dict("records")
    assert sharding_plots.gpu_counts(rows[0]) == {1: rows[0]["1 GPU"], 2: rows[0]["2 GPUs"], 4: rows[0]["4 GPUs"]}
    fig = sharding_plots.per_gpu_figure(rows)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["full fine-tuning", "LoRA", "QLoRA (NF4 base)"]
    assert all(len(ax.get_lines()) == 5 + 2 for ax in fig.axes if ax.get_title())  # 5 models, 2 GPU lines
    from lorabook.viz import plots

    assert plots.smallest_text_pt(fig) >= plots.MIN_TEXT_PT  # legible in the book's column
    assert plots.deck_smallest_text_px(fig, dpi=100) >= plots.DECK_MIN_TEXT_PX  # and on a slide
    with pytest.raises(ValueError, match="budget_table"):
        sharding_plots.per_gpu_figure([])
