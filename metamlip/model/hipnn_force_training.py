"""The weight gradient of a loss on HIP-NN's energies and forces, written out: the backward of
`metamlip.model.hipnn_forces.HipnnEnergyForces`.

Given dL/d(atom energies) (n,) and dL/d(distance gradient) (n, k), two sweeps of the trace:

1. the adjoint of the force pass, blocks in forward order (the force pass ran them in reverse):
   the weight gradients that flow through the forces, and the cotangents the force pass leaves on
   forward-pass quantities (sigmoid(h) of every layer; sensitivities, their slopes and the
   neighbour features of every interaction);
2. the adjoint of the forward pass, blocks in reverse order, from the energies' cotangent and those.

A "cotangent" is dL/d(quantity); a "gradient" in the trace is dE/d(quantity) of the force pass.
Checked against autograd's double backward of `HipnnBackbone.forward` (tests/test_hipnn_forces.py).
"""

from __future__ import annotations

import torch

from metamlip.model.hipnn_forces import AtomLayerTrace, InteractionTrace, InteractionWeights, NetworkTrace, SensitivityTrace, neighbour_rows


class Gradients:
    """Weight gradients accumulated per weight tensor (by identity), each in its weight's shape."""

    def __init__(self) -> None:
        self.by_id: dict[int, torch.Tensor] = {}

    def add(self, weight: torch.Tensor, gradient: torch.Tensor) -> None:
        """Adds `gradient` (a fresh tensor, reshaped to the weight's shape)."""
        key = id(weight)
        gradient = gradient.view(weight.shape) if gradient.shape != weight.shape else gradient
        self.by_id[key] = gradient if key not in self.by_id else self.by_id[key].add_(gradient)

    def add_product(self, weight: torch.Tensor, rows: torch.Tensor, right: torch.Tensor) -> None:
        """Adds rows^T @ right (both (n, .)), a gradient of the weight's (2-D) shape."""
        key = id(weight)
        if rows.shape[0] > 1 and rows.stride(0) == 0:  # the same row for every atom (the head's weights)
            product = torch.outer(rows[0], right.sum(0))
            self.by_id[key] = product if key not in self.by_id else self.by_id[key].add_(product)
        elif key in self.by_id:
            self.by_id[key].addmm_(rows.t(), right)
        else:
            self.by_id[key] = rows.t() @ right

    def of(self, weight: torch.Tensor) -> torch.Tensor | None:
        return self.by_id.get(id(weight))


def backward_pass(
    trace: NetworkTrace, energy_cotangent: torch.Tensor, distance_cotangent: torch.Tensor, input_cotangent: bool
) -> tuple[Gradients, torch.Tensor | None]:
    """Weight gradients, and dL/d(input features) when `input_cotangent`, of a loss whose gradients
    with respect to the atom energies (n,) and the distance gradient (n, k) are given."""
    weights = trace.weights
    gradients = Gradients()
    slot_cotangent = distance_cotangent.unsqueeze(-1)
    left_by_forces = []  # per block: per chunk, cotangents of the sensitivities, their slopes and dE/ds; dL/d(sigmoid(h)) per layer
    upward = None  # dL/d(dE/d(input features of the block))
    for index, block in enumerate(trace.blocks):
        cotangent, carried, slope_cotangent = interaction_force_adjoint(block.interaction, upward, slot_cotangent, trace.neighbour_index, gradients)
        slope_cotangents = [slope_cotangent]
        for layer in block.atom_layers:
            cotangent, slope_cotangent = atom_layer_force_adjoint(layer, cotangent, gradients)
            slope_cotangents.append(slope_cotangent)
        left_by_forces.append((carried, slope_cotangents))
        gradients.add(weights.read_out_weights[index + 1], cotangent.sum(0))
        upward = cotangent
    downward = None  # dL/d(features of the block)
    for index in range(len(trace.blocks) - 1, -1, -1):
        block = trace.blocks[index]
        carried, slope_cotangents = left_by_forces[index]
        read_out = weights.read_out_weights[index + 1]
        gradients.add(read_out, energy_cotangent @ block.output)
        gradients.add(weights.read_out_biases[index], energy_cotangent.sum())
        energy_term = torch.outer(energy_cotangent, read_out[0])
        downward = energy_term if downward is None else downward.add_(energy_term)
        for layer, slope_cotangent in zip(reversed(block.atom_layers), reversed(slope_cotangents[1:])):
            downward = atom_layer_adjoint(layer, downward, slope_cotangent, gradients)
        downward = interaction_adjoint(
            block.interaction, downward, slope_cotangents[0], carried, trace.neighbour_index, index > 0 or input_cotangent, gradients
        )
    gradients.add(weights.read_out_weights[0], energy_cotangent @ trace.input_features)
    if not input_cotangent:
        return gradients, None
    return gradients, downward.addr_(energy_cotangent, weights.read_out_weights[0][0])


def interaction_force_adjoint(
    trace: InteractionTrace, input_gradient_cotangent: torch.Tensor | None, slot_cotangent: torch.Tensor,
    neighbour_index: torch.Tensor, gradients: Gradients,
) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """Adjoint of `interaction_force`: dL/d(output gradient); per chunk, the cotangents it leaves on the
    sensitivities and their slopes, and dL/d(dE/ds) (whose product with dE/d(environment) feeds the
    neighbour features' cotangent in `interaction_adjoint`); dL/d(sigmoid(h))."""
    weights, features = trace.weights, trace.features
    n_in, n_sensitivities = features.shape[1], weights.mu.shape[1]
    output_cotangent = None
    if input_gradient_cotangent is None:
        pre_activation_cotangent = features.new_zeros(trace.pre_activation_gradient.shape)
    else:
        pre_activation_cotangent = input_gradient_cotangent @ weights.self_weight.t()
        if weights.adjust_weight is None:
            output_cotangent = input_gradient_cotangent
        else:
            output_cotangent = input_gradient_cotangent @ weights.adjust_weight.t()
            gradients.add_product(weights.adjust_weight, trace.output_gradient, input_gradient_cotangent)
        gradients.add_product(weights.self_weight, trace.pre_activation_gradient, input_gradient_cotangent)
    trace.matrix_cotangent = weights.matrix.new_zeros(weights.matrix.shape)
    carried = []
    for atoms, sensitivity, sensitivity_gradient in zip(trace.chunks, trace.sensitivity, trace.sensitivity_gradient):
        sensitivity_gradient_cotangent = slot_cotangent[atoms] * sensitivity.slopes
        slopes_cotangent = slot_cotangent[atoms] * sensitivity_gradient
        environment_gradient = trace.environment_gradient[atoms]
        environment_gradient_cotangent = torch.bmm(sensitivity_gradient_cotangent.transpose(1, 2), neighbour_rows(features, neighbour_index, atoms))
        values_cotangent = None
        if input_gradient_cotangent is not None:  # dE/dx was scattered to the neighbours: its cotangent is gathered
            spread = neighbour_rows(input_gradient_cotangent, neighbour_index, atoms)
            values_cotangent = torch.bmm(spread, environment_gradient.transpose(1, 2))
            environment_gradient_cotangent.baddbmm_(sensitivity.values.transpose(1, 2), spread)
        flat_cotangent = environment_gradient_cotangent.view(-1, n_sensitivities * n_in)
        pre_activation_cotangent[atoms].addmm_(flat_cotangent, weights.matrix.t())
        trace.matrix_cotangent.addmm_(trace.pre_activation_gradient[atoms].t(), flat_cotangent)
        carried.append((values_cotangent, slopes_cotangent, sensitivity_gradient_cotangent))
    middle_cotangent = pre_activation_cotangent * trace.activation_slope
    slope_cotangent = pre_activation_cotangent.mul_(trace.middle_gradient)
    gradients.add_product(weights.res_weight, trace.output_gradient, middle_cotangent)
    product = middle_cotangent @ weights.res_weight.t()
    output_cotangent = product if output_cotangent is None else product.add_(output_cotangent)
    return output_cotangent, carried, slope_cotangent


def atom_layer_force_adjoint(trace: AtomLayerTrace, input_gradient_cotangent: torch.Tensor, gradients: Gradients) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of G -> G + ((G W2) * sigmoid(h)) W1: dL/dG and dL/d(sigmoid(h))."""
    weights = trace.weights
    pre_activation_cotangent = input_gradient_cotangent @ weights.base_weight.t()
    gradients.add_product(weights.base_weight, trace.pre_activation_gradient, input_gradient_cotangent)
    middle_cotangent = pre_activation_cotangent * trace.activation_slope
    slope_cotangent = pre_activation_cotangent.mul_(trace.middle_gradient)
    gradients.add_product(weights.res_weight, trace.output_gradient, middle_cotangent)
    return torch.addmm(input_gradient_cotangent, middle_cotangent, weights.res_weight.t()), slope_cotangent


def activation_adjoint(activation_cotangent: torch.Tensor, slope: torch.Tensor, slope_cotangent: torch.Tensor) -> torch.Tensor:
    """dL/dh from dL/d(softplus(h)) and dL/d(sigmoid(h)): sigmoid (a + s (1 - sigmoid))."""
    return torch.addcmul(activation_cotangent, slope_cotangent, 1.0 - slope).mul_(slope)


def atom_layer_adjoint(trace: AtomLayerTrace, output_cotangent: torch.Tensor, slope_cotangent: torch.Tensor, gradients: Gradients) -> torch.Tensor:
    """Adjoint of x -> x + W2 softplus(W1 x + b1) + b2, with the force pass's dL/d(sigmoid(h)): dL/dx."""
    weights = trace.weights
    gradients.add_product(weights.res_weight, output_cotangent, trace.activation)
    gradients.add(weights.res_bias, output_cotangent.sum(0))
    pre_activation_cotangent = activation_adjoint(output_cotangent @ weights.res_weight, trace.activation_slope, slope_cotangent)
    gradients.add_product(weights.base_weight, pre_activation_cotangent, trace.features)
    gradients.add(weights.base_bias, pre_activation_cotangent.sum(0))
    return torch.addmm(output_cotangent, pre_activation_cotangent, weights.base_weight)


def interaction_adjoint(
    trace: InteractionTrace, output_cotangent: torch.Tensor, slope_cotangent: torch.Tensor, carried: list[tuple],
    neighbour_index: torch.Tensor, need_features: bool, gradients: Gradients,
) -> torch.Tensor | None:
    """Adjoint of the interaction layer and its residual, with the force adjoint's cotangents: dL/dx (when asked)."""
    weights, features = trace.weights, trace.features
    n_in = features.shape[1]
    gradients.add_product(weights.res_weight, output_cotangent, trace.activation)
    gradients.add(weights.res_bias, output_cotangent.sum(0))
    pre_activation_cotangent = activation_adjoint(output_cotangent @ weights.res_weight, trace.activation_slope, slope_cotangent)
    gradients.add_product(weights.self_weight, pre_activation_cotangent, trace.features)
    gradients.add(weights.self_bias, pre_activation_cotangent.sum(0))
    matrix_cotangent = trace.matrix_cotangent.addmm_(pre_activation_cotangent.t(), trace.environment)
    n_sensitivities, n_out, _ = weights.int_weights.shape
    gradients.add(weights.int_weights, matrix_cotangent.view(n_out, n_sensitivities, n_in).transpose(0, 1))
    if weights.adjust_weight is not None:
        gradients.add_product(weights.adjust_weight, output_cotangent, trace.features)
    input_cotangent = None
    if need_features:
        if weights.adjust_weight is None:
            input_cotangent = torch.addmm(output_cotangent, pre_activation_cotangent, weights.self_weight)
        else:
            input_cotangent = (output_cotangent @ weights.adjust_weight).addmm_(pre_activation_cotangent, weights.self_weight)
    for atoms, sensitivity, (values_cotangent, slopes_cotangent, sensitivity_gradient_cotangent) in zip(trace.chunks, trace.sensitivity, carried):
        environment_cotangent = (pre_activation_cotangent[atoms] @ weights.matrix).view(-1, n_sensitivities, n_in)
        rows = neighbour_rows(features, neighbour_index, atoms)
        if values_cotangent is None:
            values_cotangent = torch.bmm(rows, environment_cotangent.transpose(1, 2))
        else:
            values_cotangent.baddbmm_(rows, environment_cotangent.transpose(1, 2))
        sensitivity_adjoint(weights, sensitivity, values_cotangent, slopes_cotangent, gradients)
        if input_cotangent is not None:  # both products reach the neighbours' features: scattered back to them
            message = torch.bmm(sensitivity.values, environment_cotangent).baddbmm_(sensitivity_gradient_cotangent, trace.environment_gradient[atoms])
            input_cotangent.index_add_(0, neighbour_index[atoms].reshape(-1), message.view(-1, n_in))
    return input_cotangent


def sensitivity_adjoint(
    weights: InteractionWeights, sensitivity: SensitivityTrace, values_cotangent: torch.Tensor, slopes_cotangent: torch.Tensor, gradients: Gradients,
) -> None:
    """Adds the gradients of mu and sigma from dL/ds and dL/d(ds/dr), each (atoms, k, v) of one chunk.

    With u = (1/r - 1/mu) sigma, s = g c and ds/dr = g (u sigma q + c'), q = c / r^2:
    ds/du = -u s, d(ds/dr)/du = -u ds/dr + g sigma q, d(ds/dr)/dsigma at fixed u = g u q,
    du/dsigma = u / sigma and du/dmu = sigma / mu^2. Where the Gaussian's exponent is floored these
    terms are off by less than |u| exp(-50), far below rounding.
    """
    sigma, mu = weights.sigma, weights.mu
    slope_term = (slopes_cotangent * sensitivity.gaussian).mul_(sensitivity.geometry.cutoff_over_distance_squared)  # dL/d(ds/dr) g q
    value_term = torch.addcmul(values_cotangent * sensitivity.values, slopes_cotangent, sensitivity.slopes)
    offset_cotangent = torch.addcmul(slope_term * sigma, sensitivity.scaled_offset, value_term, value=-1.0)  # dL/du
    sigma_sum = torch.addcmul(offset_cotangent, slope_term, sigma).mul_(sensitivity.scaled_offset).sum((0, 1))
    gradients.add(weights.sigma, sigma_sum / sigma)
    gradients.add(weights.mu, offset_cotangent.sum((0, 1)) * (sigma / torch.square(mu)))
