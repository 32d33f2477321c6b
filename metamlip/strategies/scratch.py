"""`scratch`: no pre-training; fine-tuning starts from random weights."""

from metamlip.strategies.base import Strategy


class Scratch(Strategy):
    name = "scratch"
    pretrains = False
