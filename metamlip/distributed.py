"""Training on several processes: a thin layer over `torch.distributed`.

Launched with ``torchrun --nproc_per_node N -m metamlip pretrain CONFIG``, every process
(rank) runs the same training loop on the same seeds. Two kinds of parallelism plug into it:

- data parallel (`joint`, `multihead`, fine-tuning): every global batch is cut into one
  contiguous shard per rank (`ShardedBatcher`); each rank weights its loss terms by its
  shard's share of the global batch (structures for the energy term, atoms for the force
  term), so the *sum* of the ranks' gradients is exactly the gradient of the single-process
  loss on the whole batch. The gradients are summed with one `all_reduce` per step
  (`data_parallel_backward`). DistributedDataParallel is not used: its reducer averages over
  ranks (our shards are not equal-sized), needs `find_unused_parameters` for the per-level
  heads of `multihead`, and its hooks were not designed around the double backward that
  forces need (``create_graph=True``); a plain `all_reduce` of one flat gradient vector is
  exact, and is still PyTorch's own distributed engine.
- task parallel (`reptile`): each rank adapts its own tasks of a meta-step; see
  `metamlip.strategies.reptile`.

Outside torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything here is a no-op
and the serial code paths run unchanged. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from metamlip.data.batching import Batch
from metamlip.errors import InputError
from metamlip.training.loss import BatchLoss, LossWeights, batch_loss


def init_from_environment() -> bool:
    """Join the process group that torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Backend: gloo for CPU tensors, plus NCCL for CUDA tensors when CUDA is available
    (``METAMLIP_DIST_BACKEND`` overrides). Returns whether this process is one of several.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    default = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=os.environ.get("METAMLIP_DIST_BACKEND", default))
    return dist.get_world_size() > 1


def training_device(name: str) -> torch.device:
    """The torch device for config value `name` ('cpu', 'cuda', 'cuda:N'); under torchrun,
    'cuda' means this process's GPU (``LOCAL_RANK``)."""
    if not str(name).startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise InputError(f"config key 'training.device' is {name!r} but PyTorch sees no CUDA device")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Number of processes training together (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's index, 0 ... world_size() - 1 (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Whether this process writes checkpoints, logs and progress bars (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (no-op when not distributed)."""
    if world_size() > 1:
        dist.barrier()


def sum_across_processes(vector: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a flat tensor over all processes, in place; one all-reduce."""
    if world_size() > 1:
        dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return vector


def copy_from_main_process(module: torch.nn.Module) -> None:
    """Overwrite `module`'s parameters and buffers with rank 0's, in place (as DDP does at start)."""
    if world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def value_of_main_process(value: float) -> float:
    """Rank 0's `value` on every process (e.g. a wall-clock time that decides when to stop)."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return float(holder[0])


class Batcher(Protocol):
    """What `ShardedBatcher` needs of a batcher (`StructureBatcher` or an out-of-core one)."""

    n_atoms: np.ndarray

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> Batch: ...

    def batch_orders(self, batch_size: int, seed: int | tuple[int, ...] | None = None) -> Iterator[np.ndarray]: ...


class ShardedBatcher:
    """This rank's shard of every global batch of `batcher`.

    The global batches are the single-process ones (same order, same seeds); rank r builds
    only the r-th of `world_size` contiguous, near-equal parts of each, and records the global
    batch's size in `Batch.shard_of` for the loss weighting.
    """

    def __init__(self, batcher: Batcher, process_rank: int, processes: int) -> None:
        self.batcher = batcher
        self.process_rank = process_rank
        self.processes = processes

    def __len__(self) -> int:
        return len(self.batcher)

    def batches(self, batch_size: int, seed: int | tuple[int, ...] | None = None) -> Iterator[Batch]:
        for indices in self.batcher.batch_orders(batch_size, seed):
            shard = np.array_split(indices, self.processes)[self.process_rank]
            batch = self.batcher.batch(shard)
            batch.shard_of = (len(indices), int(self.batcher.n_atoms[indices].sum()))
            yield batch


def sharded(batcher: Batcher) -> Batcher | ShardedBatcher:
    """`batcher` itself in a single process, else this rank's `ShardedBatcher` over it."""
    return batcher if world_size() == 1 else ShardedBatcher(batcher, rank(), world_size())


def data_parallel_backward(model: torch.nn.Module, batch: Batch, weights: LossWeights) -> BatchLoss:
    """Backward pass of this rank's shard, then the gradients summed over ranks in one all-reduce.

    The shard's energy term is weighted by (its structures / global structures) and its force
    term by (its atoms / global atoms): summed over ranks, the loss and its gradient are those of
    the whole global batch. Parameters that no rank's graph reached keep ``grad = None`` (so Adam
    skips them, as in a single process). Returns the global batch's loss parts.
    """
    structures, atoms = batch.shard_of if batch.shard_of is not None else (batch.n_structures, int(batch.n_atoms.sum()))
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    energy_share = batch.n_structures / structures
    force_share = float(batch.n_atoms.sum()) / atoms
    device = parameters[0].device
    loss_parts = torch.zeros(4, dtype=torch.float64)  # total, energy MSE, force MSE, force used
    if batch.n_structures:
        scaled = LossWeights(energy=weights.energy * energy_share, forces=weights.forces * force_share)
        loss = batch_loss(model, batch, scaled)
        loss.total.backward()
        loss_parts[0] = float(loss.total.detach())
        loss_parts[1] = loss.energy_mse_per_atom_ev2 * energy_share
        if loss.force_mse_ev2_per_angstrom2 is not None:
            loss_parts[2] = loss.force_mse_ev2_per_angstrom2 * force_share
            loss_parts[3] = 1.0
    gradients = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in parameters]
    reached = torch.tensor([p.grad is not None for p in parameters], dtype=parameters[0].dtype, device=device)
    flat = sum_across_processes(torch.cat([*gradients, reached, loss_parts.to(device, parameters[0].dtype)]))
    offset = 0
    for parameter, was_reached in zip(parameters, flat[-4 - len(parameters) : -4]):
        size = parameter.numel()
        parameter.grad = flat[offset : offset + size].view_as(parameter).clone() if was_reached > 0 else None
        offset += size
    total, energy, force, force_used = flat[-4:].tolist()
    return BatchLoss(torch.tensor(total), energy, force if force_used > 0 else None)
