"""HIP-NN inference as one compiled C++ call (`hipnn_native.cpp`), built on first use.

Opt-in (`Potential.use_native`): energies and dE/d(distance) of every neighbour slot, the same
function as `hipnn_forces.evaluate`, without Python between its operations and with the
element-wise work fused. Only inference on the CPU runs through it; training (which needs the
trace of the forward pass for its hand-written backward) and other devices keep the Python path.

The extension is compiled with torch.utils.cpp_extension (a C++ compiler and Python's headers are
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
                f"HIP-NN native kernels: building {SOURCE} failed (needs a C++ compiler, Python's headers and glibc's libmvec): {error}"
            ) from error
    return _BUILT[capability]


def energies_and_distance_gradient(
    weights: HipnnWeights, input_features: torch.Tensor, neighbour_index: torch.Tensor, distance_angstrom: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) atom energies and (n, k) d(sum of atom energies)/d(distance) of every slot, by the
    compiled extension; no graph (inference only)."""
    interactions, atom_layers = [], []
    for interaction, layers in zip(weights.interactions, weights.atom_layers):
        adjust = interaction.adjust_weight if interaction.adjust_weight is not None else interaction.self_weight.new_empty(0)
        interactions += [
            interaction.mu, interaction.sigma, interaction.matrix, interaction.self_weight, interaction.self_bias,
            interaction.res_weight, interaction.res_bias, adjust,
        ]
        for layer in layers:
            atom_layers += layer.tensors()
    energies, distance_gradient = native_module().energies_and_distance_gradient(
        interactions, atom_layers, len(weights.atom_layers[0]), [interaction.cutoff_angstrom for interaction in weights.interactions],
        weights.read_out_weights, weights.read_out_biases, input_features, neighbour_index, distance_angstrom, hipnn_forces.SLOT_CHUNK_BYTES,
    )
    return energies, distance_gradient
