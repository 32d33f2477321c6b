"""HIP-NN's energies, forces and their weight gradient as compiled C++ (`hipnn_native.cpp`), built on first use.

Opt-in (`Potential.use_native`): the same kernels as `hipnn_forces` (forward and force passes) and
`hipnn_force_training` (the written-out backward), operation for operation, without Python between
the operations, with the element-wise work fused and the per-atom slot products as vector loops.
`energies_and_forces` goes from positions to forces (what `Potential.hipnn_forward` does without
stress); `energies_and_distance_gradient` from distances. On the CPU only; other devices keep the
Python kernels.

The extension is compiled with torch.utils.cpp_extension (GCC on Linux and Python's headers are
needed; ~30 s once, then cached under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions),
for the vector instructions torch itself uses on this CPU, and links glibc's vector maths (libmvec).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from metamlip.errors import InputError
from metamlip.model import hipnn_forces
from metamlip.model.hipnn_forces import HipnnWeights

SOURCE = Path(__file__).with_name("hipnn_native.cpp")
COMPILER_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
VECTOR_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx2", "-mfma"]}  # by torch.backends.cpu.get_cpu_capability()

_BUILT: dict[str, ModuleType] = {}


def native_module() -> ModuleType:
    """The compiled extension (built on the first call of a process, or loaded from the cache).
    A failed build raises InputError with the compiler's message."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _BUILT:
        from torch.utils.cpp_extension import load

        name = f"metamlip_hipnn_native_{capability.lower()}"  # one cache entry per instruction set: a shared home may span CPUs
        try:
            _BUILT[capability] = load(
                name, [str(SOURCE)], extra_cflags=COMPILER_FLAGS + VECTOR_FLAGS.get(capability, []), extra_ldflags=["-lmvec"], verbose=False
            )
        except (RuntimeError, OSError, ImportError) as error:
            raise InputError(
                f"HIP-NN native kernels: building {SOURCE} failed (needs Linux with glibc's libmvec, GCC, Python's headers and ninja): {error}"
            ) from error
    return _BUILT[capability]


def kernel_arguments(weights: HipnnWeights) -> list:
    """The weights as the extension takes them: interaction tensors, atom-layer tensors, atom layers
    per block, cutoffs, read-out weights and biases."""
    interactions, atom_layers = [], []
    for interaction, layers in zip(weights.interactions, weights.atom_layers):
        adjust = interaction.adjust_weight if interaction.adjust_weight is not None else interaction.self_weight.new_empty(0)
        interactions += [
            interaction.mu, interaction.sigma, interaction.matrix, interaction.self_weight, interaction.self_bias,
            interaction.res_weight, interaction.res_bias, adjust,
        ]
        for layer in layers:
            atom_layers += layer.tensors()
    cutoffs = [interaction.cutoff_angstrom for interaction in weights.interactions]
    return [interactions, atom_layers, len(weights.atom_layers[0]), cutoffs, weights.read_out_weights, weights.read_out_biases]


def forward_and_force(
    weights: HipnnWeights, input_features: torch.Tensor, neighbour_index: torch.Tensor, distance_angstrom: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The extension's forward and force passes: atom energies, distance gradient and the trace
    (an opaque object that `backward` takes)."""
    return native_module().forward(*kernel_arguments(weights), input_features, neighbour_index, distance_angstrom, hipnn_forces.SLOT_CHUNK_BYTES)


def forward_forces(
    weights: HipnnWeights, input_features: torch.Tensor, positions_angstrom: torch.Tensor, neighbour_index: torch.Tensor,
    neighbour_shift_angstrom: torch.Tensor, neighbour_mask: torch.Tensor, padding_angstrom: float,
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The extension's passes from positions: atom energies, forces and the trace (for `backward_forces`)."""
    return native_module().forward_forces(
        *kernel_arguments(weights), input_features, neighbour_index, positions_angstrom, neighbour_shift_angstrom, neighbour_mask,
        padding_angstrom, hipnn_forces.SLOT_CHUNK_BYTES,
    )


class NativeEnergyForces(torch.autograd.Function):
    """`hipnn_forces.HipnnEnergyForces` with both passes and the written-out backward in C++.
    Arguments: `HipnnWeights`, neighbour index (n, k), distances (n, k), input features (n, f_0),
    then the weights' `tensors()`."""

    @staticmethod
    def forward(ctx, weights, neighbour_index, distance_angstrom, input_features, *weight_tensors):
        energies, distance_gradient, ctx.trace = forward_and_force(weights, input_features, neighbour_index, distance_angstrom)
        return energies, distance_gradient

    @staticmethod
    def backward(ctx, energy_cotangent, distance_cotangent):
        if ctx.needs_input_grad[2]:
            raise RuntimeError("HIP-NN's hand-written forces have no gradient with respect to distances (no Hessians)")
        gradients, input_cotangent = native_module().backward(ctx.trace, energy_cotangent, distance_cotangent, ctx.needs_input_grad[3])
        return (None, None, None, input_cotangent, *gradients)


class NativeForces(torch.autograd.Function):
    """`NativeEnergyForces` with the displacements, distances and forces in C++ too: from positions to
    atom energies and forces. Arguments: `HipnnWeights`, neighbour index, shift and mask (n, k, ...),
    the padding vector's component, positions (n, 3), input features, then the weights' `tensors()`."""

    @staticmethod
    def forward(ctx, weights, neighbour_index, shift, mask, padding, positions, input_features, *weight_tensors):
        energies, forces, ctx.trace = forward_forces(weights, input_features, positions, neighbour_index, shift, mask, padding)
        return energies, forces

    @staticmethod
    def backward(ctx, energy_cotangent, force_cotangent):
        if ctx.needs_input_grad[5]:
            raise RuntimeError("HIP-NN's hand-written forces have no gradient with respect to positions (no Hessians)")
        gradients, input_cotangent = native_module().backward_forces(ctx.trace, energy_cotangent, force_cotangent, ctx.needs_input_grad[6])
        return (None, None, None, None, None, None, input_cotangent, *gradients)


def energies_and_forces(
    weights: HipnnWeights, input_features: torch.Tensor, positions_angstrom: torch.Tensor, neighbour_index: torch.Tensor,
    neighbour_shift_angstrom: torch.Tensor, neighbour_mask: torch.Tensor, padding_angstrom: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) atom energies and (n, 3) forces in eV/Angstrom from positions and neighbour slots (index,
    periodic shift and mask, each (n, k, ...); `padding_angstrom` in each component of a padded slot's
    displacement), all in the compiled extension; with gradients on, both carry the written-out
    backward to the weights (and the input features)."""
    arguments = (neighbour_index, neighbour_shift_angstrom, neighbour_mask, padding_angstrom, positions_angstrom, input_features)
    if torch.is_grad_enabled():
        return NativeForces.apply(weights, *arguments, *weights.tensors())
    energies, forces, _ = forward_forces(weights, input_features, positions_angstrom, neighbour_index, neighbour_shift_angstrom, neighbour_mask, padding_angstrom)
    return energies, forces


def energies_and_distance_gradient(
    weights: HipnnWeights, input_features: torch.Tensor, neighbour_index: torch.Tensor, distance_angstrom: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) atom energies and (n, k) d(sum of atom energies)/d(distance) of every slot, by the
    compiled extension: with gradients on, both carry the written-out backward to the weights (and
    the input features); with them off, no trace is kept."""
    if torch.is_grad_enabled():
        return NativeEnergyForces.apply(weights, neighbour_index, distance_angstrom, input_features, *weights.tensors())
    energies, distance_gradient, _ = forward_and_force(weights, input_features, neighbour_index, distance_angstrom)
    return energies, distance_gradient
