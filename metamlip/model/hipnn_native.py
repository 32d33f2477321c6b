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


ENTRIES = {"distances": ("forward", "backward"), "positions": ("forward_forces", "backward_forces")}  # the extension's, by start


def native_passes(
    weights: HipnnWeights, start: str, input_features: torch.Tensor, neighbour_index: torch.Tensor, geometry: torch.Tensor, slots: tuple = ()
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The extension's forward and force passes from "distances" (n, k) or "positions" (n, 3), with
    `slots` (periodic shift, mask, padding component) for positions: atom energies, then dE/d(distance)
    or forces, and the trace (an opaque object that the matching backward takes)."""
    forward = getattr(native_module(), ENTRIES[start][0])
    return forward(*kernel_arguments(weights), input_features, neighbour_index, geometry, *slots, hipnn_forces.SLOT_CHUNK_BYTES)


class NativeEnergyForces(torch.autograd.Function):
    """`hipnn_forces.HipnnEnergyForces` with both passes and the written-out backward in C++, from
    distances (outputs: atom energies, dE/d(distance)) or from positions (atom energies, forces).
    Arguments: `HipnnWeights`, "distances" or "positions", neighbour index (n, k), the geometry, the
    slots' other tensors (`native_passes`), input features (n, f_0), then the weights' `tensors()`."""

    @staticmethod
    def forward(ctx, weights, start, neighbour_index, geometry, slots, input_features, *weight_tensors):
        energies, second, ctx.trace = native_passes(weights, start, input_features, neighbour_index, geometry, slots)
        ctx.start = start
        return energies, second

    @staticmethod
    def backward(ctx, energy_cotangent, second_cotangent):
        if ctx.needs_input_grad[3]:
            raise RuntimeError(f"HIP-NN's hand-written forces have no gradient with respect to {ctx.start} (no Hessians)")
        backward = getattr(native_module(), ENTRIES[ctx.start][1])
        gradients, input_cotangent = backward(ctx.trace, energy_cotangent, second_cotangent, ctx.needs_input_grad[5])
        return (None, None, None, None, None, input_cotangent, *gradients)


def native_energies(
    weights: HipnnWeights, start: str, input_features: torch.Tensor, neighbour_index: torch.Tensor, geometry: torch.Tensor, slots: tuple = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """`native_passes` without the trace: with gradients on, both outputs carry the written-out
    backward to the weights (and the input features); with them off, no trace is kept."""
    if torch.is_grad_enabled():
        return NativeEnergyForces.apply(weights, start, neighbour_index, geometry, slots, input_features, *weights.tensors())
    energies, second, _ = native_passes(weights, start, input_features, neighbour_index, geometry, slots)
    return energies, second


def energies_and_forces(
    weights: HipnnWeights, input_features: torch.Tensor, positions_angstrom: torch.Tensor, neighbour_index: torch.Tensor,
    neighbour_shift_angstrom: torch.Tensor, neighbour_mask: torch.Tensor, padding_angstrom: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) atom energies and (n, 3) forces in eV/Angstrom from positions and neighbour slots (index,
    periodic shift and mask, each (n, k, ...); `padding_angstrom` in each component of a padded slot's
    displacement), all in the compiled extension."""
    slots = (neighbour_shift_angstrom, neighbour_mask, padding_angstrom)
    return native_energies(weights, "positions", input_features, neighbour_index, positions_angstrom, slots)


def energies_and_distance_gradient(
    weights: HipnnWeights, input_features: torch.Tensor, neighbour_index: torch.Tensor, distance_angstrom: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) atom energies and (n, k) d(sum of atom energies)/d(distance) of every slot, by the
    compiled extension."""
    return native_energies(weights, "distances", input_features, neighbour_index, distance_angstrom)
