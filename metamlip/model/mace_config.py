"""Shape of a MACE backbone as plain data (Batatia et al., NeurIPS 2022), importable without
mace-torch: the `model.mace` config keys and the level-embedding width.

Key names follow mace-torch's training script (`--num_channels`, `--max_L`, `--max_ell`,
`--correlation`, `--num_interactions`, `--radial_MLP`, `--avg_num_neighbors`) and its model
arguments (`num_bessel`, `num_polynomial_cutoff`); the cutoff is `cutoff_angstrom` (MACE's
`r_max`). Defaults are a small model for a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class MaceSection:
    """The `model.mace` keys. Distances in Angstrom.

    Attributes:
        num_channels: channels of every irrep of the hidden node features.
        max_L: highest angular momentum of the hidden features (hidden irreps num_channels x
            (0e + 1o + ... up to max_L)); the last block keeps only the scalars, as in MACE.
        max_ell: highest angular momentum of the edge spherical harmonics.
        correlation: body order minus one of the symmetric product of every block.
        num_interactions: interaction + product blocks.
        num_bessel: Bessel radial basis functions.
        num_polynomial_cutoff: power p of the polynomial cutoff envelope.
        cutoff_angstrom: radial cutoff (MACE's r_max).
        radial_MLP: widths of the hidden layers of the radial network.
        avg_num_neighbors: messages are divided by this (mace-torch computes it from the training
            set; here it is a key: ethanol within 5 Angstrom has 8).
        level_embedding_into: where a level embedding enters (models with `n_level_features`):
            `node_embedding`, the linear node embedding only (as HIP-NN's first layer takes it;
            interactions, skip connections and product weights see the one-hot species), or
            `node_attributes`, every block's node attributes (so the per-element weights of the
            product basis and skip connections become mixtures; models before this key).
    """

    num_channels: int = 32
    max_L: int = 1
    max_ell: int = 3
    correlation: int = 3
    num_interactions: int = 2
    num_bessel: int = 8
    num_polynomial_cutoff: int = 5
    cutoff_angstrom: float = 5.0
    radial_MLP: list[int] = field(default_factory=lambda: [64, 64, 64])
    avg_num_neighbors: float = 8.0
    level_embedding_into: str = "node_embedding"


LEVEL_EMBEDDING_PLACES = ("node_embedding", "node_attributes")


@dataclass(frozen=True)
class MaceConfig(MaceSection):
    """A MACE backbone's shape: the `model.mace` keys plus `n_level_features` (the width of the
    level-embedding vector appended to the one-hot species; 0 for none)."""

    n_level_features: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MaceConfig:
        """The shape from a checkpoint's plain data; one written before `level_embedding_into`
        existed fed its embedding into every block's node attributes."""
        return cls(**{"level_embedding_into": "node_attributes", **values})
