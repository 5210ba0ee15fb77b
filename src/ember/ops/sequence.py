"""Sequence and optional values: a sequence is a Python list of tensors, an empty optional is None."""
from __future__ import annotations

from typing import Optional

import torch

from .registry import op
from .tensor import host_ints, norm_axis


def _position(position: Optional[torch.Tensor], length: int, default: int, inserting: bool = False) -> int:
    if position is None:
        return default
    p = int(position.reshape(()).item())
    hi = length + 1 if inserting else length
    if not -length <= p < hi:
        raise IndexError(f"sequence position {p} is out of range for a sequence of {length}")
    return p + length if p < 0 else p


@op("SequenceConstruct", kind="other")
def sequence_construct(*inputs):
    return list(inputs)


@op("SequenceEmpty", kind="other")
def sequence_empty(*, dtype: Optional[int] = None):
    return []


@op("SequenceAt", kind="other", host_inputs=("position",))
def sequence_at(input_sequence, position):
    return input_sequence[_position(position, len(input_sequence), 0)]


@op("SequenceInsert", kind="other", host_inputs=("position",))
def sequence_insert(input_sequence, tensor, position=None):
    out = list(input_sequence)
    out.insert(_position(position, len(out), len(out), inserting=True), tensor)
    return out


@op("SequenceErase", kind="other", host_inputs=("position",))
def sequence_erase(input_sequence, position=None):
    out = list(input_sequence)
    del out[_position(position, len(out), len(out) - 1)]
    return out


@op("SequenceLength", kind="other")
def sequence_length(input_sequence):
    return torch.tensor(len(input_sequence), dtype=torch.int64)


@op("SplitToSequence", kind="other")
def split_to_sequence(input, split=None, *, axis: int = 0, keepdims: int = 1):
    axis = norm_axis(axis, input.dim())
    if split is None:
        parts = torch.split(input, 1, dim=axis)
        return [p.squeeze(axis) for p in parts] if not keepdims else list(parts)
    sizes = host_ints(split)
    if split.dim() == 0:
        return list(torch.split(input, sizes[0], dim=axis))
    return list(torch.split(input, sizes, dim=axis))


@op("ConcatFromSequence", kind="other")
def concat_from_sequence(input_sequence, *, axis: int, new_axis: int = 0):
    rank = input_sequence[0].dim() + (1 if new_axis else 0)
    a = norm_axis(axis, rank)
    if new_axis:
        return torch.stack(list(input_sequence), dim=a)
    return torch.cat(list(input_sequence), dim=a)


@op("Optional", kind="other")
def optional(input=None, *, type: Optional[str] = None):
    return input


@op("OptionalHasElement", kind="other")
def optional_has_element(input=None):
    device = input.device if isinstance(input, torch.Tensor) else None
    return torch.tensor(input is not None, dtype=torch.bool, device=device)


@op("OptionalGetElement", kind="other")
def optional_get_element(input):
    if input is None:
        raise ValueError("OptionalGetElement on an empty optional")
    return input
