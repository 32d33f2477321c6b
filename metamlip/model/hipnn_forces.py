"""HIP-NN energies with their exact distance gradient, and the weight gradient of both, written out.

`Potential` takes HIP-NN forces from here instead of autograd. `energies_and_distance_gradient`
runs the network forward (keeping what the derivatives need), then dE/d(distance) of every
neighbour slot, layer by layer from the energy head down (the *force pass*). Both run inside one
autograd Function whose backward, the gradient of a loss on energies and forces with respect to
every weight, is written out too (`metamlip.model.hipnn_force_training`). Force training thus runs
one forward and one first-order backward instead of differentiating autograd's own backward (the
double backward that took 60% of a training step), and inference builds no graph at all.

`HipnnBackbone.forward` stays the definition of the network; this is its fast path, checked against
autograd of that definition for energies, forces, stress and every weight gradient
(tests/test_hipnn_forces.py). Forces have no gradient with respect to positions here (no Hessians).

Shapes: n atoms, k neighbour slots, v sensitivities; f_in / f_out features into / out of a layer.
Sensitivity tensors are laid out (n, k, v); the environment sum and its derivatives are batched
matmuls over atoms, oriented so that their operands are contiguous where it matters for speed.
Everything with a row per neighbour slot is made for a chunk of atoms at a time (`slot_chunks`):
one chunk for small batches, several when many neighbours would overflow the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional

from metamlip.model.energy_head import HierarchicalEnergyHead
from metamlip.model.hipnn import GAUSSIAN_EXPONENT_FLOOR, HipnnBackbone, Residual


def own(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters by name. Read through the module's dicts (`_parameters`, `_modules`)
    rather than attribute access, which costs ~2 us per name in `nn.Module.__getattr__`: collecting
    the ~50 weights took ~0.2 ms a call, a tenth of a molecular-dynamics step."""
    return module._parameters


@dataclass
class InteractionWeights:
    """An interaction layer and its residual as plain tensors (the module's own parameters)."""

    mu: torch.Tensor  # (1, v) sensitivity centres, Angstrom
    sigma: torch.Tensor  # (1, v) sensitivity widths, Angstrom
    int_weights: torch.Tensor  # (v, f_out, f_in)
    self_weight: torch.Tensor  # (f_out, f_in)
    self_bias: torch.Tensor  # (f_out,)
    res_weight: torch.Tensor  # (f_out, f_out)
    res_bias: torch.Tensor  # (f_out,)
    adjust_weight: torch.Tensor | None  # (f_out, f_in), None when f_in == f_out
    cutoff_angstrom: float
    matrix: torch.Tensor  # (f_out, v * f_in) int_weights as one matrix (a constant copy: not a graph node)

    @classmethod
    def of(cls, residual: Residual) -> InteractionWeights:
        interaction = residual._modules["base_layer"]  # see `own`
        parts = interaction._modules
        sensitivity, selfint, res = own(parts["sensitivity"]), own(parts["selfint"]), own(residual._modules["res_layer"])
        adjust = residual._modules.get("adjust_layer")
        int_weights = own(interaction)["int_weights"]
        return cls(
            sensitivity["mu"], sensitivity["sigma"], int_weights, selfint["weight"], selfint["bias"], res["weight"], res["bias"],
            None if adjust is None else own(adjust)["weight"], parts["sensitivity"].cutoff_angstrom, interaction_matrix(int_weights),
        )

    def tensors(self) -> list[torch.Tensor]:
        parameters = [self.mu, self.sigma, self.int_weights, self.self_weight, self.self_bias, self.res_weight, self.res_bias]
        return parameters + ([] if self.adjust_weight is None else [self.adjust_weight])


def interaction_matrix(int_weights: torch.Tensor) -> torch.Tensor:
    """(f_out, v * f_in) matrix W with W[o, v * f_in + f] = int_weights[v, o, f], so that the interaction
    is environment (n, v * f_in) @ W^T. Copied at every call (6x faster than the (v * f_in, f_out)
    layout, whose copy transposes every 64 x 64 block); not cached: fused Adam changes the weights in
    place without bumping their version counter, so no cache key would notice."""
    n_sensitivities, n_out, n_in = int_weights.shape
    with torch.no_grad():
        return int_weights.permute(1, 0, 2).reshape(n_out, n_sensitivities * n_in)


@dataclass
class AtomLayerWeights:
    """A residual atom layer x + W2 softplus(W1 x + b1) + b2 as plain tensors."""

    base_weight: torch.Tensor  # W1 (f_mid, f)
    base_bias: torch.Tensor  # (f_mid,)
    res_weight: torch.Tensor  # W2 (f, f_mid)
    res_bias: torch.Tensor  # (f,)

    @classmethod
    def of(cls, residual: Residual) -> AtomLayerWeights:
        base, res = own(residual._modules["base_layer"]), own(residual._modules["res_layer"])
        return cls(base["weight"], base["bias"], res["weight"], res["bias"])

    def tensors(self) -> list[torch.Tensor]:
        return [self.base_weight, self.base_bias, self.res_weight, self.res_bias]


@dataclass
class HipnnWeights:
    """Every weight of a HIP-NN backbone and one energy head, by layer."""

    interactions: list[InteractionWeights]
    atom_layers: list[list[AtomLayerWeights]]  # per block
    read_out_weights: list[torch.Tensor]  # (1, f_b) for the input and every block
    read_out_biases: list[torch.Tensor]  # (1,) for every block (the input's read-out has none)

    @classmethod
    def of(cls, backbone: HipnnBackbone, head: HierarchicalEnergyHead) -> HipnnWeights:
        blocks = [list(block._modules.values()) for block in backbone._modules["blocks"]._modules.values()]
        read_outs = [own(layer) for layer in head._modules["layers"]._modules.values()]
        return cls(
            [InteractionWeights.of(block[0]) for block in blocks],
            [[AtomLayerWeights.of(layer) for layer in block[1:]] for block in blocks],
            [layer["weight"] for layer in read_outs],
            [layer["bias"] for layer in read_outs[1:]],
        )

    def tensors(self) -> list[torch.Tensor]:
        """Each weight once, in a fixed order (the autograd Function's inputs)."""
        tensors = list(self.read_out_weights) + list(self.read_out_biases)
        for interaction, layers in zip(self.interactions, self.atom_layers):
            tensors += interaction.tensors()
            for layer in layers:
                tensors += layer.tensors()
        return tensors


@dataclass
class SlotGeometry:
    """Per-slot terms of one cutoff, each (n, k, 1): 1/r, the cosine cutoff c(r) = cos^2(pi r / 2 r_c)
    for r <= r_c (0 beyond), its slope c'(r), and c(r) / r^2."""

    inverse_distance: torch.Tensor
    cutoff: torch.Tensor
    cutoff_slope: torch.Tensor
    cutoff_over_distance_squared: torch.Tensor

    @classmethod
    def of(cls, distance_angstrom: torch.Tensor, cutoff_angstrom: float) -> SlotGeometry:
        """From (n, k) distances; padded slots lie beyond the cutoff and get zeros."""
        distance = distance_angstrom.unsqueeze(-1)
        inverse = distance.reciprocal()
        inside = (distance <= cutoff_angstrom).to(distance.dtype)
        scale = 0.5 * math.pi / cutoff_angstrom
        cutoff = torch.square(torch.cos(scale * distance)).mul_(inside)
        slope = torch.sin((2.0 * scale) * distance).mul_(inside).mul_(-scale)
        return cls(inverse, cutoff, slope, cutoff * torch.square(inverse))

    def part(self, atoms: slice) -> SlotGeometry:
        """The terms of the atoms in range `atoms` (views)."""
        return SlotGeometry(self.inverse_distance[atoms], self.cutoff[atoms], self.cutoff_slope[atoms], self.cutoff_over_distance_squared[atoms])


@dataclass
class SensitivityTrace:
    """s_v(r) = g c and ds/dr = g (u sigma c / r^2 + c'), with u = (1/r - 1/mu) sigma and
    g = exp(-u^2 / 2); each (atoms, k, v) for one chunk of atoms."""

    geometry: SlotGeometry
    scaled_offset: torch.Tensor  # u
    gaussian: torch.Tensor  # g
    values: torch.Tensor  # s
    slopes: torch.Tensor  # ds/dr


@dataclass
class InteractionTrace:
    """One interaction layer (with its residual) in the forward pass, then the force pass."""

    weights: InteractionWeights
    features: torch.Tensor  # (n, f_in) input x (the neighbour slots' rows are gathered from it where needed)
    chunks: list[slice]  # ranges of atoms, see `slot_chunks`
    sensitivity: list[SensitivityTrace]  # per chunk
    environment: torch.Tensor  # (n, v * f_in) sum over slots of s x_j
    activation: torch.Tensor  # (n, f_out) softplus(h)
    activation_slope: torch.Tensor  # (n, f_out) sigmoid(h)
    output_gradient: torch.Tensor | None = None  # (n, f_out) dE/d(output): force pass from here
    middle_gradient: torch.Tensor | None = None  # (n, f_out) dE/d(output) W_res
    pre_activation_gradient: torch.Tensor | None = None  # (n, f_out) dE/dh
    environment_gradient: torch.Tensor | None = None  # (n, v, f_in) dE/d(environment)
    sensitivity_gradient: list[torch.Tensor] | None = None  # per chunk (atoms, k, v) dE/ds
    matrix_cotangent: torch.Tensor | None = None  # (f_out, v * f_in) dL/d(matrix), filled by the backward


@dataclass
class AtomLayerTrace:
    """One residual atom layer in the forward pass, then the force pass."""

    weights: AtomLayerWeights
    features: torch.Tensor  # (n, f) input x
    activation: torch.Tensor  # (n, f_mid)
    activation_slope: torch.Tensor  # (n, f_mid)
    output_gradient: torch.Tensor | None = None  # (n, f) dE/d(output): force pass from here
    middle_gradient: torch.Tensor | None = None  # (n, f_mid) dE/d(output) W2
    pre_activation_gradient: torch.Tensor | None = None  # (n, f_mid)


@dataclass
class BlockTrace:
    interaction: InteractionTrace
    atom_layers: list[AtomLayerTrace]
    output: torch.Tensor  # (n, f) features of the block


@dataclass
class NetworkTrace:
    """The forward and force passes of one batch: everything the hand-written backward needs."""

    weights: HipnnWeights
    input_features: torch.Tensor  # (n, f_0)
    neighbour_index: torch.Tensor  # (n, k)
    blocks: list[BlockTrace] = field(default_factory=list)


def sensitivity_forward(weights: InteractionWeights, geometry: SlotGeometry) -> SensitivityTrace:
    """Sensitivities and their distance slopes; the Gaussian's exponent is floored (see hipnn.py)."""
    sigma = weights.sigma
    offset = torch.addcmul(-sigma / weights.mu, geometry.inverse_distance, sigma)
    gaussian = torch.addcmul(offset.new_zeros(()), offset, offset, value=-0.5).clamp_min_(GAUSSIAN_EXPONENT_FLOOR).exp_()
    values = gaussian * geometry.cutoff
    slopes = torch.addcmul(geometry.cutoff_slope, offset * sigma, geometry.cutoff_over_distance_squared).mul_(gaussian)
    return SensitivityTrace(geometry, offset, gaussian, values, slopes)


def interaction_forward(weights: InteractionWeights, features: torch.Tensor, neighbour_index: torch.Tensor, geometry: SlotGeometry) -> InteractionTrace:
    """h = sum_v V_v sum_j s_v(r_ij) x_j + W_self x + b_self, and softplus(h), sigmoid(h)."""
    (n_atoms, n_in), n_slots, n_sensitivities = features.shape, neighbour_index.shape[1], weights.mu.shape[1]
    chunks = slot_chunks(n_atoms, n_slots * (n_in + 4 * n_sensitivities), features.element_size())
    environment = features.new_empty((n_atoms, n_sensitivities * n_in))  # explicit sizes: a shard may hold no atoms
    pre_activation = torch.addmm(weights.self_bias, features, weights.self_weight.t())
    sensitivities = []
    for atoms in chunks:
        sensitivities.append(sensitivity_forward(weights, geometry.part(atoms)))
        part = environment[atoms]
        torch.bmm(sensitivities[-1].values.transpose(1, 2), neighbour_rows(features, neighbour_index, atoms), out=part.view(-1, n_sensitivities, n_in))
        pre_activation[atoms].addmm_(part, weights.matrix.t())
    return InteractionTrace(
        weights, features, chunks, sensitivities, environment, functional.softplus(pre_activation), torch.sigmoid(pre_activation),
    )


def atom_layer_forward(weights: AtomLayerWeights, features: torch.Tensor) -> AtomLayerTrace:
    pre_activation = torch.addmm(weights.base_bias, features, weights.base_weight.t())
    return AtomLayerTrace(weights, features, functional.softplus(pre_activation), torch.sigmoid(pre_activation))


def residual_output(
    features: torch.Tensor, activation: torch.Tensor, res_weight: torch.Tensor, res_bias: torch.Tensor, adjust_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """A x + W_res activation + b_res (A the identity or the adjust layer)."""
    skip = features if adjust_weight is None else features @ adjust_weight.t()
    return torch.addmm(res_bias, activation, res_weight.t()).add_(skip)


def forward_pass(
    weights: HipnnWeights, input_features: torch.Tensor, neighbour_index: torch.Tensor, distance_angstrom: torch.Tensor
) -> tuple[torch.Tensor, NetworkTrace]:
    """(n,) atom energies and the trace of the forward pass."""
    trace = NetworkTrace(weights, input_features, neighbour_index)
    geometries: dict[float, SlotGeometry] = {}
    features = input_features
    energies = torch.mv(features, weights.read_out_weights[0][0])
    for interaction, layers, read_out, bias in zip(weights.interactions, weights.atom_layers, weights.read_out_weights[1:], weights.read_out_biases):
        if interaction.cutoff_angstrom not in geometries:
            geometries[interaction.cutoff_angstrom] = SlotGeometry.of(distance_angstrom, interaction.cutoff_angstrom)
        interaction_trace = interaction_forward(interaction, features, trace.neighbour_index, geometries[interaction.cutoff_angstrom])
        features = residual_output(features, interaction_trace.activation, interaction.res_weight, interaction.res_bias, interaction.adjust_weight)
        layer_traces = []
        for layer in layers:
            layer_traces.append(atom_layer_forward(layer, features))
            features = residual_output(features, layer_traces[-1].activation, layer.res_weight, layer.res_bias)
        trace.blocks.append(BlockTrace(interaction_trace, layer_traces, features))
        energies = torch.addmv(energies, features, read_out[0]).add_(bias)
    return energies, trace


def force_pass(trace: NetworkTrace) -> torch.Tensor:
    """(n, k) d(sum of atom energies)/d(distance of each slot), from the energy head down."""
    n_atoms = trace.input_features.shape[0]
    read_outs = trace.weights.read_out_weights
    distance_gradient = None
    gradient = read_outs[-1].expand(n_atoms, -1)  # dE/d(features of the last block)
    for index in range(len(trace.blocks) - 1, -1, -1):
        block = trace.blocks[index]
        for layer in reversed(block.atom_layers):
            layer.output_gradient = gradient
            layer.middle_gradient = row_product(gradient, layer.weights.res_weight)
            layer.pre_activation_gradient = layer.middle_gradient * layer.activation_slope
            gradient = torch.addmm(gradient, layer.pre_activation_gradient, layer.weights.base_weight)
        input_gradient, slot_gradient = interaction_force(block.interaction, gradient, trace.neighbour_index, index > 0)
        distance_gradient = slot_gradient if distance_gradient is None else distance_gradient.add_(slot_gradient)
        if index > 0:
            gradient = input_gradient.add_(read_outs[index])
    return distance_gradient


def interaction_force(
    trace: InteractionTrace, output_gradient: torch.Tensor, neighbour_index: torch.Tensor, input_gradient: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """dE/dx of the layer's input (when asked) and dE/d(distance) (n, k) of one interaction layer."""
    weights, features = trace.weights, trace.features
    (n_atoms, n_in), n_sensitivities = features.shape, weights.mu.shape[1]
    trace.output_gradient = output_gradient
    trace.middle_gradient = row_product(output_gradient, weights.res_weight)
    trace.pre_activation_gradient = trace.middle_gradient * trace.activation_slope
    trace.environment_gradient = features.new_empty((n_atoms, n_sensitivities, n_in))
    trace.sensitivity_gradient = []
    distance_gradient = features.new_empty(neighbour_index.shape)
    gradient = None
    if input_gradient:
        skip = output_gradient if weights.adjust_weight is None else output_gradient @ weights.adjust_weight
        gradient = torch.addmm(skip, trace.pre_activation_gradient, weights.self_weight)
    for atoms, sensitivity in zip(trace.chunks, trace.sensitivity):
        environment_gradient = trace.environment_gradient[atoms]
        torch.mm(trace.pre_activation_gradient[atoms], weights.matrix, out=environment_gradient.view(-1, n_sensitivities * n_in))
        sensitivity_gradient = torch.bmm(neighbour_rows(features, neighbour_index, atoms), environment_gradient.transpose(1, 2))
        torch.sum(sensitivity_gradient * sensitivity.slopes, dim=-1, out=distance_gradient[atoms])
        trace.sensitivity_gradient.append(sensitivity_gradient)
        if gradient is not None:  # every slot sends s dE/d(environment) to its neighbour
            message = torch.bmm(sensitivity.values, environment_gradient)
            gradient.index_add_(0, neighbour_index[atoms].reshape(-1), message.view(-1, n_in))
    return gradient, distance_gradient


# Tensors with a row per neighbour slot, (atoms, k, .), are made for a chunk of atoms at a time, with
# about this many bytes of such data per chunk, when the whole batch would take more than 4 chunks:
# with many neighbours (k ~ 26 for a 27-atom molecule, ~150 in liquid water) or in float64, whole
# tensors leave the cache before they are used again. 1 MB (the L2 cache of a core here) was the
# fastest of 128 KB to 4 MB for batches of 64 SPICE molecules in float32 (1.1-1.6x faster than
# unchunked) and among the fastest in float64 (ethanol and SPICE, 1.1-1.4x); the slots' features are
# gathered where needed, chunk by chunk, never kept for the whole batch.
SLOT_CHUNK_BYTES = 1 << 20


def slot_chunks(n_atoms: int, slot_elements_per_atom: int, element_size: int) -> list[slice]:
    """Ranges of atoms, each with about `SLOT_CHUNK_BYTES` of per-slot data; one range for small
    batches, and under torch.compile (which would otherwise guard on every size)."""
    bytes_per_atom = max(1, slot_elements_per_atom * element_size)
    if compiling() or n_atoms * bytes_per_atom <= 4 * SLOT_CHUNK_BYTES:
        return [slice(0, n_atoms)]
    step = max(1, SLOT_CHUNK_BYTES // bytes_per_atom)
    return [slice(start, min(start + step, n_atoms)) for start in range(0, n_atoms, step)]


def neighbour_rows(features: torch.Tensor, neighbour_index: torch.Tensor, atoms: slice) -> torch.Tensor:
    """(atoms, k, f) rows of `features` (n, f) at the neighbour slots of the atoms in range `atoms`."""
    index = neighbour_index[atoms]
    return features.index_select(0, index.reshape(-1)).view(index.shape[0], index.shape[1], features.shape[1])


def compiling() -> bool:
    """Whether torch.compile is tracing this call (`torch.compiler.is_compiling` from torch 2.3 on)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else torch._dynamo.is_compiling()


def row_product(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """rows @ matrix, done once when every row is the same (the head's weights broadcast over atoms)."""
    if rows.shape[0] > 1 and rows.stride(0) == 0:
        return (rows[:1] @ matrix).expand(rows.shape[0], -1)
    return rows @ matrix


def evaluate(
    weights: HipnnWeights, input_features: torch.Tensor, neighbour_index: torch.Tensor, distance_angstrom: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, NetworkTrace]:
    """Atom energies (n,), their distance gradient (n, k) and the trace: forward and force passes."""
    energies, trace = forward_pass(weights, input_features, neighbour_index, distance_angstrom)
    return energies, force_pass(trace), trace


_COMPILED: dict[str, Callable] = {}


def kernels(compiled: bool) -> tuple[Callable, Callable]:
    """`evaluate` and the hand-written backward, eager or each wrapped in `torch.compile` (dynamic
    shapes; compiled on first use, ~30 s, then cached by inductor on disk)."""
    from metamlip.model.hipnn_force_training import backward_pass

    if not compiled:
        return evaluate, backward_pass
    if not _COMPILED:
        _COMPILED["evaluate"] = torch.compile(evaluate, dynamic=True)
        _COMPILED["backward"] = torch.compile(backward_pass, dynamic=True)
    return _COMPILED["evaluate"], _COMPILED["backward"]


class HipnnEnergyForces(torch.autograd.Function):
    """(n,) atom energies and (n, k) d(sum of energies)/d(distance) of every slot, from the weights;
    the backward is written out (first order: enough to train on energies and forces; the distances
    get no gradient). Arguments: `HipnnWeights`, whether to use the compiled kernels, neighbour index
    (n, k), distances (n, k), input features (n, f_0), then the weights' `tensors()` (so that
    autograd hands them their gradients)."""

    @staticmethod
    def forward(ctx, weights, compiled, neighbour_index, distance_angstrom, input_features, *weight_tensors):
        energies, distance_gradient, ctx.trace = kernels(compiled)[0](weights, input_features, neighbour_index, distance_angstrom)
        ctx.compiled = compiled
        ctx.save_for_backward(*weight_tensors)
        return energies, distance_gradient

    @staticmethod
    def backward(ctx, energy_cotangent, distance_cotangent):
        if ctx.needs_input_grad[3]:
            raise RuntimeError("HIP-NN's hand-written forces have no gradient with respect to distances (no Hessians)")
        weight_tensors = ctx.saved_tensors
        backward_pass = kernels(ctx.compiled)[1]
        gradients, input_cotangent = backward_pass(ctx.trace, energy_cotangent, distance_cotangent, ctx.needs_input_grad[4])
        return (None, None, None, None, input_cotangent, *[gradients.of(tensor) for tensor in weight_tensors])


def energies_and_distance_gradient(
    backbone: HipnnBackbone, head: HierarchicalEnergyHead, input_features: torch.Tensor,
    neighbour_index: torch.Tensor, distance_angstrom: torch.Tensor, compiled: bool = False, native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) atom energies and (n, k) d(sum of atom energies)/d(distance) of every neighbour slot;
    `compiled` runs both passes and the backward through `torch.compile`; `native` (on the CPU)
    through the C++ extension of `hipnn_native` instead."""
    weights = HipnnWeights.of(backbone, head)
    if native and distance_angstrom.device.type == "cpu":
        from metamlip.model import hipnn_native  # imports this module

        return hipnn_native.energies_and_distance_gradient(weights, input_features, neighbour_index, distance_angstrom)
    return HipnnEnergyForces.apply(weights, compiled, neighbour_index, distance_angstrom, input_features, *weights.tensors())
