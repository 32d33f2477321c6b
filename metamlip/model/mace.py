"""MACE backbone (Batatia, Kovacs, Simm, Ortner, Csanyi, NeurIPS 2022), assembled from
mace-torch's own blocks as mace-torch's `MACE` model wires them.

The one-hot species are the node attributes; a level embedding, when the model has one, joins
them at the linear node embedding only or in every block (`MaceConfig.level_embedding_into`); a
linear node embedding, Bessel radial features times a polynomial cutoff, spherical
harmonics of the edge directions, then interaction + symmetric-product blocks (the first
interaction without residual, as mace-torch's training script builds `MACE`). The backbone
returns the node embedding's input and the scalar (0e) node features after every product block; the
hierarchical head reads each out linearly (mace-torch reads the last block through a small
MLP instead). Needs the optional mace-torch package (`pip install -e ".[mace]"`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from torch import nn

from metamlip.model.backbone import Backbone
from metamlip.model.mace_config import MaceConfig
from metamlip.model.new_species import SpeciesBlock

WEIGHTS_ONLY_OFF_SWITCH = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def importing_mace_torch() -> Iterator[None]:
    """Two side effects of importing mace-torch 0.3.16 and e3nn 0.4.4 under torch >= 2.6, contained:
    e3nn reads its constants file (which holds `slice` objects) with torch.load's default,
    weights_only=True, so `slice` is allowed for the imports; and `import mace` sets
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, turning off safe loading for every later torch.load of
    the process that does not pass weights_only, so the variable is restored afterwards."""
    previous = os.environ.get(WEIGHTS_ONLY_OFF_SWITCH)
    allow_slice = torch.serialization.safe_globals([slice]) if hasattr(torch.serialization, "safe_globals") else contextlib.nullcontext()
    try:
        with allow_slice:
            yield
    finally:
        if previous is None:
            os.environ.pop(WEIGHTS_ONLY_OFF_SWITCH, None)
        else:
            os.environ[WEIGHTS_ONLY_OFF_SWITCH] = previous


with importing_mace_torch():
    from e3nn import o3
    from mace.modules.blocks import (
        EquivariantProductBasisBlock,
        LinearNodeEmbeddingBlock,
        RadialEmbeddingBlock,
        RealAgnosticInteractionBlock,
        RealAgnosticResidualInteractionBlock,
    )

SCALAR = o3.Irrep(0, 1)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to `dtype` inside the block and restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class MaceBackbone(Backbone):
    """MACE interaction and product blocks; features per block are the node embedding's input
    (one-hot species [and level embedding]) and the scalar channels of each product block's output."""

    def __init__(self, n_species: int, config: MaceConfig):
        super().__init__()
        self.config = config
        self.n_species = n_species
        with default_dtype(torch.float64):  # mace-torch's constants (Clebsch-Gordan U matrices) in full precision
            self.build_blocks(n_species, config)
        self.feature_sizes = [n_species + config.n_level_features] + [config.num_channels] * config.num_interactions

    def build_blocks(self, n_species: int, config: MaceConfig) -> None:
        """The node embedding, radial embedding, spherical harmonics, interactions and products."""
        n_inputs = n_species + config.n_level_features  # the node embedding's input
        n_attributes = n_inputs if config.level_embedding_into == "node_attributes" else n_species
        attribute_irreps = o3.Irreps([(n_attributes, SCALAR)])
        scalar_irreps = o3.Irreps([(config.num_channels, SCALAR)])
        hidden_irreps = (config.num_channels * o3.Irreps.spherical_harmonics(config.max_L)).sort().irreps.simplify()
        edge_irreps = o3.Irreps.spherical_harmonics(config.max_ell)
        message_irreps = (edge_irreps * config.num_channels).sort()[0].simplify()
        self.node_embedding = LinearNodeEmbeddingBlock(irreps_in=o3.Irreps([(n_inputs, SCALAR)]), irreps_out=scalar_irreps)
        self.radial_embedding = RadialEmbeddingBlock(
            r_max=config.cutoff_angstrom, num_bessel=config.num_bessel, num_polynomial_cutoff=config.num_polynomial_cutoff
        )
        self.spherical_harmonics = o3.SphericalHarmonics(edge_irreps, normalize=True, normalization="component")
        self.interactions = nn.ModuleList()
        self.products = nn.ModuleList()
        node_irreps = scalar_irreps
        for index in range(config.num_interactions):
            last = index == config.num_interactions - 1
            output_irreps = scalar_irreps if last else hidden_irreps  # the last block keeps the scalars only
            interaction_class = RealAgnosticInteractionBlock if index == 0 else RealAgnosticResidualInteractionBlock
            interaction = interaction_class(
                node_attrs_irreps=attribute_irreps,
                node_feats_irreps=node_irreps,
                edge_attrs_irreps=edge_irreps,
                edge_feats_irreps=o3.Irreps(f"{config.num_bessel}x0e"),
                target_irreps=message_irreps,
                hidden_irreps=output_irreps,
                avg_num_neighbors=config.avg_num_neighbors,
                radial_MLP=list(config.radial_MLP),
            )
            product = EquivariantProductBasisBlock(
                node_feats_irreps=interaction.target_irreps,
                target_irreps=output_irreps,
                correlation=config.correlation,
                num_elements=n_attributes,
                use_sc=index > 0,
                use_reduced_cg=False,
            )
            self.interactions.append(interaction)
            self.products.append(product)
            node_irreps = output_irreps

    def forward(
        self,
        species_index: torch.Tensor,
        neighbour_index: torch.Tensor,
        neighbour_mask: torch.Tensor,
        neighbour_vector_angstrom: torch.Tensor,
        level_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """[(n_atoms, n_species [+ n_level_features]) one-hot species [and level embedding], (n_atoms, num_channels) scalars
        after each product block] (arguments: `Backbone.forward`); padded slots are dropped."""
        inputs, block_features = self.equivariant_features(
            species_index, neighbour_index, neighbour_mask, neighbour_vector_angstrom, level_features
        )
        return [inputs] + [features[:, : self.config.num_channels] for features in block_features]  # 0e channels come first

    def equivariant_features(
        self,
        species_index: torch.Tensor,
        neighbour_index: torch.Tensor,
        neighbour_mask: torch.Tensor,
        neighbour_vector_angstrom: torch.Tensor,
        level_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The node embedding's input (n_atoms, n_species [+ n_level_features]) and every product
        block's output in e3nn layout (n_atoms, hidden irreps' dimension; the last block: num_channels)."""
        dtype = neighbour_vector_angstrom.dtype
        inputs = attributes = nn.functional.one_hot(species_index, self.n_species).to(dtype)
        if self.config.n_level_features:
            inputs = torch.cat([attributes, level_features.to(dtype).expand(attributes.shape[0], -1)], dim=1)
            if self.config.level_embedding_into == "node_attributes":
                attributes = inputs
        centre = torch.arange(len(species_index), device=species_index.device).unsqueeze(1).expand_as(neighbour_index)
        # mace-torch's edges: sender j, receiver i, vector r_i - r_j (pointing at the receiver)
        edge_index = torch.stack([neighbour_index[neighbour_mask], centre[neighbour_mask]])
        edge_vector = -neighbour_vector_angstrom[neighbour_mask]
        edge_length = torch.linalg.vector_norm(edge_vector, dim=-1, keepdim=True)
        edge_attributes = self.spherical_harmonics(edge_vector)
        # atomic numbers only feed mace-torch's optional distance transforms, which are not used
        edge_features, cutoff = self.radial_embedding(edge_length, attributes, edge_index, None)
        node_features = self.node_embedding(inputs)
        block_features = []
        for index, (interaction, product) in enumerate(zip(self.interactions, self.products)):
            node_features, skip = interaction(
                node_attrs=attributes,
                node_feats=node_features,
                edge_attrs=edge_attributes,
                edge_feats=edge_features,
                edge_index=edge_index,
                cutoff=cutoff,
                first_layer=index == 0,
            )
            node_features = product(node_feats=node_features, sc=skip, node_attrs=attributes)
            block_features.append(node_features)
        return inputs, block_features

    def species_weights(self) -> dict[str, list[SpeciesBlock]]:
        """The weights over the one-hot species (then the level embedding, where it enters), by
        state-dict name: the node embedding and each interaction's skip tensor product (e3nn divides
        both by sqrt of a fan-in that counts the attributes) and each product's per-element weights
        (`metamlip.model.new_species`)."""
        layout = {"node_embedding.linear.weight": e3nn_path_blocks(self.node_embedding.linear, axis=0)}
        for index, interaction in enumerate(self.interactions):
            layout[f"interactions.{index}.skip_tp.weight"] = e3nn_path_blocks(interaction.skip_tp, axis=1)
        for name, weights in self.products.named_parameters(prefix="products"):
            if ".symmetric_contractions." in name:  # (n_attributes, n_coupling, num_channels)
                layout[name] = [SpeciesBlock(0, tuple(weights.shape), 0)]
        return layout


def e3nn_path_blocks(module: nn.Module, axis: int) -> list[SpeciesBlock]:
    """The pieces of an e3nn Linear's or tensor product's flat weight, one per weighted path in
    e3nn's order, each of its path's shape ((in, out) or (in1, in2, out)) and scaled by e3nn's
    1 / sqrt(fan-in)."""
    blocks, offset = [], 0
    for instruction in module.instructions:
        if getattr(instruction, "has_weight", True):  # a Linear's paths always have weights
            blocks.append(SpeciesBlock(offset, tuple(instruction.path_shape), axis, fan_in_scaled=True))
            offset += math.prod(instruction.path_shape)
    return blocks
