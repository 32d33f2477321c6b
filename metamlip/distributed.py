"""Training on several processes: a thin layer over `torch.distributed`.

Launched with ``torchrun --nproc_per_node N -m metamlip pretrain CONFIG``, every process
(rank) runs the same training loop on the same seeds. Two kinds of parallelism plug into it:

- data parallel (`joint`, `multihead`, fine-tuning): the model is wrapped in
  `torch.nn.parallel.DistributedDataParallel` (`data_parallel_model`) and every global batch
  is cut into one contiguous shard per rank (`ShardedBatcher`). Each rank weights its loss
  terms by its shard's share of the global batch (structures for the energy term, atoms for
  the force term) times the number of ranks, so the average DDP takes of the ranks' gradients
  is exactly the gradient of the single-process loss on the whole batch, even for unequal or
  empty shards (`data_parallel_backward`). Forces are a gradient with respect to positions
  inside the forward pass, so the loss's backward is a double backward; DDP's hooks sit on
  the parameters' gradient accumulators and fire once per parameter, as they should.
- task parallel (`reptile`): each rank adapts its own tasks of a meta-step; see
  `metamlip.strategies.reptile`.

Outside torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything here is a no-op
and the serial code paths run unchanged. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from metamlip.data.batching import Batch
from metamlip.errors import InputError
from metamlip.model.potential import Potential
from metamlip.training.loss import BatchLoss, LossWeights, batch_loss


def init_from_environment() -> bool:
    """Join the process group that torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Backend: gloo for CPU tensors, plus NCCL for CUDA tensors when CUDA is available
    (``METAMLIP_DIST_BACKEND`` overrides; it needs a CPU backend too, since loss sums and
    broadcasts of settings are CPU tensors). Returns whether this process is one of several.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    default = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank < torch.cuda.device_count():  # NCCL collectives run on this process's own GPU
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=os.environ.get("METAMLIP_DIST_BACKEND", default))
    return dist.get_world_size() > 1


def training_device(name: str) -> torch.device:
    """The torch device for config value `name` ('cpu', 'cuda', 'cuda:N'); under torchrun,
    'cuda' means this process's GPU (``LOCAL_RANK``)."""
    if not str(name).startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise InputError(f"config key 'training.device' is {name!r} but PyTorch sees no CUDA device")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if name == "cuda" else torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(
            f"config key 'training.device' is {name!r}: this process needs GPU {device.index} but PyTorch sees "
            f"{torch.cuda.device_count()}; start at most that many processes per node (torchrun --nproc_per_node)"
        )
    return device


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


def data_parallel_model(model: Potential) -> DistributedDataParallel:
    """`model` wrapped for data-parallel training; the wrapper broadcasts rank 0's weights.

    A batch holds one level, so in a multi-head model the other levels' heads get no gradient
    in that step (``find_unused_parameters``); parameters that no rank used keep
    ``grad = None``, so Adam leaves them alone, as in a single process.
    """
    # the (1, n) output weights get gradients with strides (1, 1) instead of (n, 1): the same
    # memory layout, which DDP's layout check flags anyway; the warning says nothing useful
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, find_unused_parameters=len(model.heads) > 1)


def data_parallel_backward(model: DistributedDataParallel, batch: Batch, weights: LossWeights) -> BatchLoss:
    """Backward pass of this rank's shard of a global batch; DDP averages the gradients.

    The shard's energy term is weighted by (its structures / global structures) and its force
    term by (its atoms / global atoms), both times the number of ranks: the average over ranks
    of the gradients is then the gradient of the loss of the whole global batch. A rank whose
    shard is empty still takes part, with a zero loss. Returns this shard's share of the global
    batch's loss parts: summed over ranks they are the global batch's (`train_steps` sums them
    once per epoch; one more collective per step would cost ~10% of a small-molecule step).
    """
    structures, atoms = batch.shard_of if batch.shard_of is not None else (batch.n_structures, int(batch.n_atoms.sum()))
    energy_share = batch.n_structures / structures
    force_share = float(batch.n_atoms.sum()) / atoms
    if batch.n_structures:
        ranks = world_size()
        scaled = LossWeights(energy=weights.energy * energy_share * ranks, forces=weights.forces * force_share * ranks)
        loss = batch_loss(model, batch, scaled)
        loss.total.backward()
        energy = loss.energy_mse_per_atom_ev2 * energy_share
        force = None if loss.force_mse_ev2_per_angstrom2 is None else loss.force_mse_ev2_per_angstrom2 * force_share
    else:
        model(batch, forces=False).residual_energy_ev.sum().backward()  # zero loss, joins the all-reduce
        energy = 0.0
        force = 0.0 if batch.forces_ev_per_angstrom is not None and weights.forces > 0 else None  # as the other shards
    total = weights.energy * energy + (weights.forces * force if force is not None else 0.0)
    return BatchLoss(torch.tensor(total, dtype=torch.float64), energy, force)
