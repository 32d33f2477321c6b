"""Backbones by name (`model.backbone: hipnn | mace`): their shapes as plain data, and building one.

MACE needs the optional mace-torch package; without it, choosing MACE is a one-line InputError
naming the extra.
"""

from __future__ import annotations

from metamlip.errors import InputError
from metamlip.model.backbone import Backbone
from metamlip.model.hipnn import HipnnBackbone, HipnnConfig
from metamlip.model.mace_config import MaceConfig

BackboneConfig = HipnnConfig | MaceConfig
BACKBONE_CONFIGS: dict[str, type] = {"hipnn": HipnnConfig, "mace": MaceConfig}
MACE_EXTRA = 'pip install -e ".[mace]"'


def backbone_name(config: BackboneConfig) -> str:
    """The config-file name (`model.backbone`) of the backbone that `config` shapes."""
    return next(name for name, kind in BACKBONE_CONFIGS.items() if type(config) is kind)


def backbone_config(name: str, values: dict) -> BackboneConfig:
    """The shape of backbone `name` from plain data (a checkpoint's model description)."""
    if name not in BACKBONE_CONFIGS:
        raise InputError(f"unknown backbone {name!r}; known: {sorted(BACKBONE_CONFIGS)}")
    return BACKBONE_CONFIGS[name].from_dict(values)


def build_backbone(n_species: int, config: BackboneConfig) -> Backbone:
    """A fresh backbone for `n_species` elements shaped by `config` (weights from torch's RNG)."""
    if isinstance(config, MaceConfig):
        try:
            from metamlip.model.mace import MaceBackbone
        except ImportError as error:
            raise InputError(f"model.backbone mace needs the optional mace-torch package ({MACE_EXTRA}; {error})") from None
        return MaceBackbone(n_species, config)
    return HipnnBackbone(n_species, config)
