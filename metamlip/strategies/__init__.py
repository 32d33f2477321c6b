"""Pre-training strategies behind one interface: scratch, joint (k = 1), multihead, embedding,
single-level transfer, and the meta-learners reptile, reptile_multihead and fomaml."""

from metamlip.errors import InputError
from metamlip.strategies.base import PretrainBudget, Strategy
from metamlip.strategies.embedding import Embedding
from metamlip.strategies.fomaml import Fomaml
from metamlip.strategies.joint import Joint
from metamlip.strategies.multihead import MultiHead
from metamlip.strategies.reptile import ReptileSettings
from metamlip.strategies.reptile_strategy import Reptile, ReptileMultiHead
from metamlip.strategies.scratch import Scratch
from metamlip.strategies.single_level import PREFIX as SINGLE_LEVEL_PREFIX
from metamlip.strategies.single_level import SingleLevel

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Scratch, Joint, MultiHead, Embedding, Reptile, ReptileMultiHead, Fomaml)
}
META_LEARNERS = ("reptile", "reptile_multihead", "fomaml")


def get_strategy(name: str) -> Strategy:
    """The strategy called `name` (or `single:LEVEL`); InputError listing the known ones otherwise."""
    if name.startswith(SINGLE_LEVEL_PREFIX) and len(name) > len(SINGLE_LEVEL_PREFIX):
        return SingleLevel(name[len(SINGLE_LEVEL_PREFIX) :])
    if name not in STRATEGIES:
        raise InputError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)} and single:LEVEL")
    return STRATEGIES[name]()


__all__ = ["META_LEARNERS", "SINGLE_LEVEL_PREFIX", "STRATEGIES", "PretrainBudget", "ReptileSettings", "Strategy", "get_strategy"]
