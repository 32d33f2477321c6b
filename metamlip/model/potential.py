"""An interatomic potential: a backbone (HIP-NN or MACE), energy head(s) and per-level energy references.

The network predicts the residual energy of a structure (its energy minus the
linear per-element reference of the level); forces are minus the gradient of the
energy with respect to positions. Several levels may share one head (joint
training) or each have its own (multi-head); the map from level to head and the
per-level references are part of the model and of its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metamlip.data.batching import Batch
from metamlip.data.references import EnergyReference
from metamlip.errors import InputError
from metamlip.levels import normalise_level
from metamlip.model import hipnn_native
from metamlip.model.backbone_choice import BackboneConfig, backbone_config, backbone_name, build_backbone
from metamlip.model.energy_head import HierarchicalEnergyHead, structure_sums
from metamlip.model.hipnn import HipnnBackbone
from metamlip.model.hipnn_forces import HipnnWeights, energies_and_distance_gradient

SHARED_HEAD = "shared"


@dataclass
class Prediction:
    """Model output for a batch.

    Attributes:
        residual_energy_ev: (n_structures,) model dtype, energy minus the level reference.
        reference_energy_ev: (n_structures,) float64 per-level linear reference energy.
        forces_ev_per_angstrom: (n_atoms, 3) model dtype, or None when not asked for.
        atom_residual_energy_ev: (n_atoms,) model dtype, each atom's share of the residual energy.
        atom_reference_energy_ev: (n_atoms,) float64, each atom's element reference energy.
        strain_derivative_ev: (n_structures, 3, 3) model dtype, dE/d(strain) at zero strain (the
            stress times the cell volume), or None when not asked for.
    """

    residual_energy_ev: torch.Tensor
    reference_energy_ev: torch.Tensor
    forces_ev_per_angstrom: torch.Tensor | None
    atom_residual_energy_ev: torch.Tensor | None = None
    atom_reference_energy_ev: torch.Tensor | None = None
    strain_derivative_ev: torch.Tensor | None = None

    @property
    def energy_ev(self) -> torch.Tensor:
        """(n_structures,) float64 total energies."""
        return self.residual_energy_ev.detach().double() + self.reference_energy_ev

    @property
    def atom_energy_ev(self) -> torch.Tensor:
        """(n_atoms,) float64 per-atom energies; per structure they sum to `energy_ev` (to the
        round-off of the model dtype)."""
        return self.atom_residual_energy_ev.detach().double() + self.atom_reference_energy_ev


class Potential(nn.Module):
    """Backbone (its shape `config`: a HipnnConfig or MaceConfig) + named energy heads + per-level references."""

    def __init__(self, species: list[int], config: BackboneConfig, head_names: list[str] = (SHARED_HEAD,)):
        super().__init__()
        self.species = [int(z) for z in species]
        self.config = config
        self.backbone = build_backbone(len(self.species), config)
        self.heads = nn.ModuleDict({name: HierarchicalEnergyHead(self.backbone.feature_sizes) for name in head_names})
        self.references: dict[str, EnergyReference] = {}
        self.level_heads: dict[str, str] = {}
        self.level_embeddings = nn.ParameterDict()  # "embedding<i>" -> (n_level_features,) vector
        self.level_embedding_keys: dict[str, str] = {}  # level -> key of level_embeddings
        self.compiled = False  # HIP-NN: run the hand-written force kernels through torch.compile (`use_compile`)
        self.native = False  # HIP-NN: the hand-written kernels as compiled C++ on the CPU (`use_native`)

    @property
    def levels(self) -> list[str]:
        return list(self.level_heads)

    def add_level(self, reference: EnergyReference, head: str = SHARED_HEAD, embedding_from_mean: bool = False) -> None:
        """Register a level with its reference; a new head name gets a fresh head. A model with
        level embeddings gives a new level its vector: seeded random, or the mean of the others'."""
        if list(reference.elements) != self.species:
            raise InputError(f"level {reference.level!r}: reference elements {reference.elements} differ from model species {self.species}")
        if head not in self.heads:
            self.add_level_head(head)
        if self.config.n_level_features and reference.level not in self.level_embedding_keys:
            self.add_level_embedding(reference.level, from_mean=embedding_from_mean)
        self.references[reference.level] = reference
        self.level_heads[reference.level] = head

    def add_level_embedding(self, level: str, from_mean: bool = False) -> None:
        """A vector of `n_level_features` for `level`: N(0, 1) seeded by the number of vectors so far
        (reproducible, the same on every rank), or the mean of the existing vectors."""
        parameter = next(self.parameters())
        if from_mean and len(self.level_embeddings):
            vector = torch.stack([value.detach() for value in self.level_embeddings.values()]).mean(dim=0)
        else:
            generator = torch.Generator().manual_seed(len(self.level_embeddings))
            vector = torch.randn(self.config.n_level_features, generator=generator)
        key = f"embedding{len(self.level_embeddings)}"
        self.level_embeddings[key] = nn.Parameter(vector.to(parameter.device, parameter.dtype).clone())
        self.level_embedding_keys[level] = key

    def level_features(self, level: str) -> torch.Tensor | None:
        """(n_level_features,) embedding of `level`, None for a model without level embeddings."""
        if not self.config.n_level_features:
            return None
        return self.level_embeddings[self.level_embedding_keys[level]]

    def add_level_head(self, head: str) -> None:
        """A fresh energy head called `head`, on the model's device and dtype; its initial weights
        depend only on how many heads the model already has (reproducible, the same on every rank)."""
        parameter = next(self.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(len(self.heads))
            self.heads[head] = HierarchicalEnergyHead(self.backbone.feature_sizes).to(parameter.device, parameter.dtype)

    def use_compile(self, compiled: bool = True) -> Potential:
        """Run HIP-NN's hand-written energy, force and training kernels through `torch.compile` (or
        back to eager code); compiled on first use (~30 s; inductor caches it on disk). Only the
        HIP-NN backbone has such kernels: asking it of another is an InputError."""
        self.require_hipnn("compile", compiled)
        self.compiled = compiled
        return self

    def use_native(self, native: bool = True) -> Potential:
        """Run HIP-NN's hand-written kernels on the CPU (energies, forces, stress, and the weight
        gradient of a loss on them) as compiled C++ (`metamlip.model.hipnn_native`), or back to
        the Python kernels (which a model on another device keeps). The extension is built now if it
        is not cached yet (~30 s once; needs a C++ compiler): a failed build is an InputError."""
        self.require_hipnn("native", native)
        if native:
            hipnn_native.native_module()
        self.native = native
        return self

    def require_hipnn(self, option: str, asked: bool) -> None:
        """InputError when `option` (a way of running HIP-NN's hand-written kernels) is asked of another backbone."""
        if asked and not isinstance(self.backbone, HipnnBackbone):
            raise InputError(f"{option} applies to the HIP-NN backbone only, not {backbone_name(self.config)}")

    def resolve_level(self, level: str | None) -> str:
        """The normalised name of a known level; None picks the only level of a one-level model."""
        if level is None:
            if len(self.level_heads) != 1:
                raise InputError(f"the model knows levels {self.levels}: name one of them")
            return self.levels[0]
        name = normalise_level(level)
        if name not in self.level_heads:
            raise InputError(f"level {level!r} unknown to the model; it knows {self.levels}")
        return name

    def reference_energy_ev(self, batch: Batch, level: str) -> torch.Tensor:
        """(n_structures,) float64 reference energies of `level` for the batch's compositions."""
        return structure_sums(self.atom_reference_energy_ev(batch, level), batch.structure_index, batch.n_structures)

    def atom_reference_energy_ev(self, batch: Batch, level: str) -> torch.Tensor:
        """(n_atoms,) float64 reference energy of each atom's element at `level`."""
        per_element = torch.as_tensor(self.references[level].energy_per_element_ev, device=batch.species_index.device)
        return per_element[batch.species_index]

    def forward(
        self, batch: Batch, level: str | None = None, forces: bool = True, create_graph: bool = False, stress: bool = False
    ) -> Prediction:
        """Energies (and forces; with `stress`, dE/d(strain) of each structure) of `batch` at `level`
        (default: the batch's own level). HIP-NN's forces come from its hand-written derivatives
        (`hipnn_forward`), other backbones' from autograd. With forces and `create_graph` False the
        energies carry no graph."""
        level = self.resolve_level(level if level is not None else batch.level)
        batch = batch.to(next(self.parameters()).device)
        if forces and isinstance(self.backbone, HipnnBackbone):
            return self.hipnn_forward(batch, level, create_graph, stress)
        positions = batch.positions_angstrom.detach().requires_grad_(forces)
        strain = positions.new_zeros((batch.n_structures, 3, 3), requires_grad=True) if stress else None
        vector = self.neighbour_vectors_angstrom(batch, positions, strain)
        features = self.backbone(batch.species_index, batch.neighbour_index, batch.neighbour_mask, vector, self.level_features(level))
        atom_residual = self.heads[self.level_heads[level]].atom_energies(features)
        residual = structure_sums(atom_residual, batch.structure_index, batch.n_structures)
        asked = ([positions] if forces else []) + ([strain] if stress else [])
        gradients = list(torch.autograd.grad(residual.sum(), asked, create_graph=create_graph)) if asked else []
        force = -gradients.pop(0) if forces else None
        strain_derivative = gradients.pop(0) if stress else None
        atom_reference = self.atom_reference_energy_ev(batch, level)
        reference = self.reference_energy_ev(batch, level)
        return Prediction(residual, reference, force, atom_residual, atom_reference, strain_derivative)

    def hipnn_forward(self, batch: Batch, level: str, create_graph: bool, stress: bool) -> Prediction:
        """`forward` of a HIP-NN model with forces: the network gives dE/d(distance) of every
        neighbour slot (`metamlip.model.hipnn_forces`), whose backward (training on forces) is
        first order, so no double backward runs and inference builds no graph. With the native
        kernels on the CPU and no stress asked, the extension goes from positions to forces itself."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and create_graph):
            positions = batch.positions_angstrom.detach()
            features = self.backbone.input_features(batch.species_index, self.level_features(level), positions.dtype)
            head = self.heads[self.level_heads[level]]
            if self.native and not stress and positions.device.type == "cpu":
                atom_residual, force = hipnn_native.energies_and_forces(
                    HipnnWeights.of(self.backbone, head), features, positions, batch.neighbour_index, batch.neighbour_shift_angstrom,
                    batch.neighbour_mask, self.padding_component_angstrom(),
                )
                strain_derivative = None
            else:
                atom_residual, force, strain_derivative = self.hipnn_forces_from_distances(batch, positions, features, head, stress)
        residual = structure_sums(atom_residual, batch.structure_index, batch.n_structures)
        atom_reference = self.atom_reference_energy_ev(batch, level)
        reference = structure_sums(atom_reference, batch.structure_index, batch.n_structures)
        return Prediction(residual, reference, force, atom_residual, atom_reference, strain_derivative)

    def hipnn_forces_from_distances(
        self, batch: Batch, positions: torch.Tensor, features: torch.Tensor, head: HierarchicalEnergyHead, stress: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Atom energies, forces and (with `stress`) dE/d(strain) of `hipnn_forward` from the slots'
        distances and dE/d(distance)."""
        vector = self.neighbour_vectors_angstrom(batch, positions)
        distance = torch.linalg.vector_norm(vector, dim=-1)
        atom_residual, distance_gradient = energies_and_distance_gradient(
            self.backbone, head, features, batch.neighbour_index, distance, compiled=self.compiled, native=self.native
        )
        slot_gradient = (distance_gradient / distance).unsqueeze(-1) * vector  # (n_atoms, k, 3) dE/d(displacement)
        # F_i = sum_k G_ik - sum of G over the slots whose neighbour is i (index_add_ with alpha=-1 is 10x slower)
        minus_force = slot_gradient.sum(1).neg_().index_add_(0, batch.neighbour_index.reshape(-1), slot_gradient.view(-1, 3))
        strain_derivative = displacement_virial(vector, slot_gradient, batch) if stress else None
        return atom_residual, minus_force.neg_(), strain_derivative

    def padding_component_angstrom(self) -> float:
        """Each component of a padded slot's displacement: its length is twice the cutoff."""
        return 2.0 * self.config.cutoff_angstrom / 3.0**0.5

    def neighbour_vectors_angstrom(
        self, batch: Batch, positions: torch.Tensor, strain: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(n_atoms, k, 3) displacement to each neighbour; padded slots get a vector of length twice
        the cutoff (beyond the reach of every backbone).

        `strain` (n_structures, 3, 3), symmetrised to eps, deforms each structure homogeneously:
        every displacement r_j + shift - r_i (a row vector) becomes (r_j + shift - r_i)(I + eps),
        as positions and cell do under ASE's `atoms.set_cell(cell @ (I + eps), scale_atoms=True)`.
        """
        neighbours = positions.index_select(0, batch.neighbour_index.reshape(-1)).view(*batch.neighbour_index.shape, 3)
        vector = neighbours - positions.unsqueeze(1) + batch.neighbour_shift_angstrom
        if strain is not None:
            symmetric = 0.5 * (strain + strain.transpose(1, 2))
            vector = vector + vector @ symmetric[batch.structure_index]
        padding = torch.full_like(vector, self.padding_component_angstrom())
        return torch.where(batch.neighbour_mask.unsqueeze(-1), vector, padding)

    def describe(self) -> dict:
        """Everything needed to rebuild this model, as plain Python types."""
        return {
            "species": self.species,
            "backbone_name": backbone_name(self.config),
            "backbone": self.config.to_dict(),
            "heads": list(self.heads),
            "level_heads": dict(self.level_heads),
            "references": {level: reference.to_dict() for level, reference in self.references.items()},
            "level_embeddings": dict(self.level_embedding_keys),
        }

    @classmethod
    def from_description(cls, description: dict) -> Potential:
        config = backbone_config(description.get("backbone_name", "hipnn"), description["backbone"])  # older checkpoints: HIP-NN
        model = cls(description["species"], config, description["heads"])
        embedding_keys = description.get("level_embeddings", {})
        for level in sorted(embedding_keys, key=lambda name: int(embedding_keys[name].removeprefix("embedding"))):
            model.add_level_embedding(level)  # in key order; the weights come with the state dict
        for level, head in description["level_heads"].items():
            model.add_level(EnergyReference.from_dict(description["references"][level]), head)
        return model


def displacement_virial(vector: torch.Tensor, slot_gradient: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(n_structures, 3, 3) dE/d(strain) at zero strain from every displacement (n_atoms, k, 3) and
    dE/d(displacement): the symmetric part of sum r (x) dE/dr over each structure's slots (strain
    deforms every displacement r into r (I + eps), as `Potential.neighbour_vectors_angstrom` does)."""
    per_atom = torch.bmm(vector.transpose(1, 2), slot_gradient)
    per_structure = per_atom.new_zeros((batch.n_structures, 3, 3)).index_add_(0, batch.structure_index, per_atom)
    return 0.5 * (per_structure + per_structure.transpose(1, 2))


def build_potential(
    species: list[int], config: BackboneConfig, seed: int, dtype: torch.dtype = torch.float32, head_names: list[str] = (SHARED_HEAD,)
) -> Potential:
    """A freshly initialised potential; the same seed gives the same weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Potential(sorted(int(z) for z in species), config, list(head_names)).to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    return model

