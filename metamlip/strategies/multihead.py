"""`multihead`: a shared backbone with one energy head and reference per level
(as MACE heads or DPA-2 multi-task); a new level's head starts from the mean of the
pre-trained heads, or from a named one."""

import torch

from metamlip.errors import InputError
from metamlip.levels import normalise_level
from metamlip.model.potential import Potential
from metamlip.strategies.joint import Joint


def level_head_name(level_index: int) -> str:
    """The head of the `level_index`-th pre-training level."""
    return f"level{level_index}"


def head_from_mean(model: Potential, head_source: str | None) -> str:
    """A new head, a copy of the mean of the model's heads (or of `head_source`'s head); its name."""
    if head_source is not None:
        source_level = normalise_level(head_source)
        if source_level not in model.level_heads:
            raise InputError(f"finetune.head_source {head_source!r} is not a pre-training level: {model.levels}")
        sources = [model.level_heads[source_level]]
    else:
        sources = sorted(set(model.level_heads.values()))
    name = level_head_name(len(model.heads))
    model.add_level_head(name)
    with torch.no_grad():
        for key, value in model.heads[name].state_dict().items():
            value.copy_(torch.stack([model.heads[source].state_dict()[key] for source in sources]).mean(dim=0))
    return name


class MultiHead(Joint):
    name = "multihead"

    def head_for_level(self, level: str, level_index: int) -> str:
        return level_head_name(level_index)

    def finetune_head(self, model: Potential, target_level: str, head_source: str | None) -> str:
        return head_from_mean(model, head_source)
