"""Pre-training strategies behind one interface: scratch, joint (k = 1), multihead, reptile."""

from metamlip.errors import InputError
from metamlip.strategies.base import PretrainBudget, Strategy
from metamlip.strategies.joint import Joint
from metamlip.strategies.multihead import MultiHead
from metamlip.strategies.reptile import ReptileSettings
from metamlip.strategies.reptile_strategy import Reptile
from metamlip.strategies.scratch import Scratch

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Scratch, Joint, MultiHead, Reptile)}


def get_strategy(name: str) -> Strategy:
    """The strategy called `name`; InputError listing the known ones otherwise."""
    if name not in STRATEGIES:
        raise InputError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name]()


__all__ = ["STRATEGIES", "PretrainBudget", "ReptileSettings", "Strategy", "get_strategy"]
