"""Pointwise math: unary, binary (numpy broadcasting), comparison, logic."""
from __future__ import annotations

import torch

from .infer import broadcast_rule, same_as_input
from .registry import op, shape_rule


@op("Add", kind="pointwise")
def add(a, b):
    return a + b


@op("Relu", kind="pointwise")
def relu(x):
    return torch.relu(x)


shape_rule("Add")(broadcast_rule())
shape_rule("Relu")(same_as_input(0))
