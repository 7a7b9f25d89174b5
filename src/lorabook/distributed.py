"""One training loop on one process or many: the glue between ``train.train`` and accelerate (chapter 9).

``train.train`` talks to the processes that share a run through a small interface: how many there
are, which one this is, ``backward``, ``no_sync`` (skip the gradient all-reduce of a micro-batch
that is not the last of a step), ``clip_grad_norm_``, ``reduce`` and ``unwrap_model``. An
``accelerate.Accelerator`` has all of them; ``LocalProcess`` is the same interface for one plain
process, doing exactly what the loop did before there was a second one. So there is one loop:

- **data**: every process draws the same seeded stream of *global* batches (per-process batch x
  processes x accumulation steps) and keeps its own slice (``shard``), as accelerate's
  ``split_batches=True`` does. Two processes with batch b therefore see, step by step, exactly the
  examples one process sees with batch 2b.
- **loss**: a causal LM's loss is a mean over target tokens, and two halves of a batch hold
  different numbers of them, so the mean of the two halves' means is not the batch's mean.
  ``loss_weight`` rescales each micro-batch's mean so that the gradients the processes average
  are those of the global batch's mean (what Hugging Face's Trainer does with
  ``num_items_in_batch``). With one process and no accumulation the weight is exactly 1.
- **seeds**: the data stream is seeded with ``seed`` in every process; torch's generator (dropout)
  with ``seed + process index``, so process 0 of a distributed run is seeded as a single run is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # label of a position the loss skips (transformers' convention)


class LocalProcess:
    """The accelerator interface for one plain process: what ``train`` did before (chapter 9)."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    distributed_type = "NO"

    def prepare(self, *objects):
        """Nothing to wrap on one process: the objects come back as given."""
        return objects[0] if len(objects) == 1 else objects

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``."""
        loss.backward()

    def no_sync(self, model):
        """Nothing to synchronise on one process."""
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params, max_norm: float):
        """``torch.nn.utils.clip_grad_norm_``."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """One process: the tensor itself."""
        return tensor

    def unwrap_model(self, model):
        """One process: the model itself."""
        return model

    def wait_for_everyone(self) -> None:
        """One process: nobody to wait for."""


class FSDPProcess:
    """FSDP "full shard" through torch's own ``fully_shard`` (FSDP2), with the accelerator interface (chapter 9).

    ``accelerate launch --use_fsdp`` gives FSDP on GPUs; on CPU processes accelerate 1.15 runs
    plain data parallelism instead (its FSDP mode is only offered with an accelerator). The FSDP2
    that accelerate's ``fsdp_version=2`` calls is torch's ``fully_shard``, which runs on CPU
    tensors over gloo: this class calls it the way accelerate does (each decoder block its own
    unit, then the whole model), so the loop and the measurements are those of FSDP2.
    """

    distributed_type = "FSDP"

    def __init__(self, block_names: Sequence[str] = ("LlamaDecoderLayer",)):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        self.num_processes = dist.get_world_size()
        self.process_index = dist.get_rank()
        self.is_main_process = self.process_index == 0
        self.device = torch.device("cpu")
        self.mesh = init_device_mesh("cpu", (self.num_processes,))
        self.block_names = tuple(block_names)

    def prepare(self, *objects):
        """Shard each module (blocks first, then the rest); optimizers come back as given."""
        from torch.distributed.fsdp import fully_shard

        out = []
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                blocks = [m for m in obj.modules() if type(m).__name__ in self.block_names]
                if not blocks:
                    raise ValueError(f"no module of type {self.block_names} to shard in "
                                     f"{type(obj).__name__}")
                for block in blocks:
                    fully_shard(block, mesh=self.mesh)
                obj = fully_shard(obj, mesh=self.mesh)
            out.append(obj)
        return out[0] if len(out) == 1 else tuple(out)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``: FSDP2 reduce-scatters (averages) the gradients during it."""
        loss.backward()

    @contextlib.contextmanager
    def no_sync(self, model):
        """Accumulate this micro-batch's gradients locally, without reduce-scatter."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, params, max_norm: float):
        """torch's clipping: it takes the norm over all shards of the DTensor gradients."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Sum (or mean) of ``tensor`` over the processes."""
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out / self.num_processes if reduction == "mean" else out

    def unwrap_model(self, model):
        """FSDP2 shards the model in place: the model itself."""
        return model

    def get_state_dict(self, model) -> dict:
        """The whole (unsharded) state dict, gathered from the shards; every process must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def wait_for_everyone(self) -> None:
        """A barrier across the processes."""
        import torch.distributed as dist

        dist.barrier()


def is_fsdp(accelerator) -> bool:
    """Whether ``accelerator`` shards the model (accelerate's FSDP or an ``FSDPProcess``) (chapter 9)."""
    return "FSDP" in str(getattr(accelerator, "distributed_type", "NO"))


def launched_distributed() -> bool:
    """True under ``accelerate launch`` / ``torchrun`` with more than one process (chapter 9)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def get_accelerator(fsdp: bool | None = None):
    """The processes of this run, behind one interface (chapter 9).

    One process: ``LocalProcess``. Several (``accelerate launch`` / ``torchrun``): an
    ``accelerate.Accelerator`` that takes the launcher's settings (DDP, FSDP, mixed precision)
    from the environment; on CPUs, with FSDP asked for (``fsdp=True`` or ``accelerate launch
    --use_fsdp``), an ``FSDPProcess``, since accelerate does not shard on CPU.
    """
    if not launched_distributed():
        return LocalProcess()
    if fsdp is None:
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not torch.cuda.is_available():
        if fsdp:
            return FSDPProcess()
        from accelerate import Accelerator

        return Accelerator(cpu=True)
    from accelerate import Accelerator

    if fsdp and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(  # what FSDPProcess does on CPUs, through accelerate
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True)
        return Accelerator(fsdp_plugin=plugin)
    return Accelerator()


def shard(global_batch: Sequence, process_index: int, num_processes: int,
          accumulation_steps: int = 1) -> list[list]:
    """This process's micro-batches of one global batch (chapter 9).

    The global batch is cut into ``num_processes`` equal slices (slice i for process i) and each
    slice into ``accumulation_steps`` micro-batches, in order. Raises if it does not divide evenly.
    """
    if num_processes < 1 or accumulation_steps < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"need num_processes >= 1, accumulation_steps >= 1 and 0 <= process_index "
                         f"< num_processes, got {num_processes}, {accumulation_steps}, {process_index}")
    per_process, rest = divmod(len(global_batch), num_processes * accumulation_steps)
    if rest or per_process == 0:
        raise ValueError(f"a global batch of {len(global_batch)} does not split into {num_processes} "
                         f"processes x {accumulation_steps} micro-batches of equal size")
    size = per_process * accumulation_steps
    mine = list(global_batch[process_index * size:(process_index + 1) * size])
    return [mine[i * per_process:(i + 1) * per_process] for i in range(accumulation_steps)]


def loss_items(labels: torch.Tensor | None, rows: int) -> int:
    """How many terms the model's loss averages: target tokens of a causal LM, else rows (chapter 9).

    A causal LM (labels of shape (B, T)) predicts token t+1 at position t, so the targets are the
    labels from position 1 on that are not ``IGNORE_INDEX``. A classifier's labels (B,) average
    over its B rows; a batch without labels counts its rows.
    """
    if labels is None or labels.dim() == 1:
        return rows
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_weight(micro_items: int, global_items: int, num_processes: int) -> float:
    """The factor that turns a micro-batch's mean loss into its share of the global mean (chapter 9).

    Process p's micro-batch m has mean loss L_pm over n_pm items; the global batch's mean is
    sum_pm n_pm L_pm / N. The processes' gradients are *averaged* (divided by P), so each backward
    uses L_pm * n_pm * P / N. One process, one micro-batch: n = N, P = 1, the factor is 1.
    """
    if global_items <= 0:
        raise ValueError(f"the global batch has no loss terms (targets), got {global_items}")
    return micro_items * num_processes / global_items


def local_bytes(tensors) -> int:
    """Bytes this process holds of ``tensors`` (a sharded DTensor counts only its local shard) (chapter 9)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and buffers held by this process (chapter 9).

    Under FSDP each process holds its shard of each; without it, all of them. Counted from the
    tensors themselves, so it is the arithmetic's exact counterpart (RSS adds the libraries,
    activations and the allocator's slack).
    """
    params = list(model.parameters())
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    state = [v for s in optimizer.state.values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]  # exp_avg, exp_avg_sq (not the step)
    return {"parameters": local_bytes(params),
            "gradients": local_bytes(p.grad for p in params),
            "optimizer": local_bytes(state),
            "buffers": local_bytes(model.buffers())}  # 4-bit codes and absmax live here, unsharded
