"""Host-side plumbing of the run path: numpy <-> torch views, pinned staging slots, padded rows.

A run with numpy inputs copies each array once into a pinned buffer and from there, on the
context's stream, into the plan's static device buffer; outputs come back the same way. The server
path (``StagedRun``) lets the batcher write request rows straight into a slot's pinned buffers.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from ..errors import InputError
from ..ops.torch_types import tensor_to_numpy, to_numpy_value, to_torch

if TYPE_CHECKING:
    from .graphs import Plan

MAX_SLOTS = 4  # staging slots per plan: runs in flight or outputs still held by a caller


@dataclass(frozen=True)
class Rows:
    """A run padded into a bucket's plan: its rows, and where the batch sits in inputs and outputs."""

    n: int
    bucket: int
    inputs: dict
    outputs: dict


def cut(outs: dict[str, Any], rows: Optional[Rows]) -> dict[str, Any]:
    """A padded run's outputs cut back to its rows."""
    if rows is None:
        return outs
    res = {}
    for k, v in outs.items():
        ax = rows.outputs.get(k)
        res[k] = v if ax is None or not isinstance(v, torch.Tensor) else v.narrow(ax, 0, v.shape[ax] // rows.bucket * rows.n)
    return res


def torch_view(a: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array (bf16/fp8 arrays of ml_dtypes through their bits)."""
    if a.ndim == 0:
        return torch_view(a.reshape(1)).reshape(())
    name = a.dtype.name
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        from ..ir.dtypes import DType

        bits = np.ascontiguousarray(a).view(np.uint8 if a.dtype.itemsize == 1 else np.int16)
        return torch.from_numpy(bits).view(to_torch(DType(name)))
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a).copy()  # torch views only writable arrays with positive strides
    return torch.from_numpy(a)


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy array sharing ``t``'s memory (writes go to ``t``), bf16/fp8 through their bits."""
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
        return bits.view(np_dtype(t.dtype))
    return t.numpy()


def dtype_name(dt: Any) -> str:
    """One name per dtype, whether numpy, torch or ember's (plans must not split on the spelling)."""
    from ..ir.dtypes import DType, from_numpy
    from ..ops.torch_types import from_torch

    try:
        if isinstance(dt, DType):
            return dt.value
        if isinstance(dt, torch.dtype):
            return from_torch(dt).value
        return from_numpy(np.dtype(dt)).value
    except Exception:
        return str(dt)


def np_dtype(dt: torch.dtype) -> Any:
    from ..ir.dtypes import to_numpy
    from ..ops.torch_types import from_torch

    return to_numpy(from_torch(dt))


def as_torch_dtype(dt: Any) -> torch.dtype:
    if isinstance(dt, torch.dtype):
        return dt
    from ..ir.dtypes import from_numpy

    return to_torch(from_numpy(np.dtype(dt)))


def warm_data(shape: tuple, dtype: Any) -> np.ndarray:
    """Inputs to plan a signature with before real data arrives: positive floats in [0.1, 1) (no
    NaN through Log, Sqrt or a division), zero integers (valid indices), all-true masks."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return np.random.default_rng(0).uniform(0.1, 1.0, shape).astype(dt)
    if dt.kind == "b":
        return np.ones(shape, dtype=dt)
    return np.zeros(shape, dtype=dt)


def host_values(x: Any) -> list:
    """The values of a (small) value input, from the host when they are there."""
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).tolist() if x.device.type != "meta" else []
    return np.asarray(x).reshape(-1).tolist()


class WarmData(Mapping):
    """Inputs for planning a signature before any data exists: made only if a plan must be built."""

    def __init__(self, shapes: Mapping[str, tuple], values: Optional[Mapping[str, Any]]):
        self.shapes, self.values, self.made = shapes, values or {}, {}

    def __getitem__(self, name: str) -> Any:
        if name in self.values:
            return np.asarray(self.values[name])
        if name not in self.made:
            shape, dt = self.shapes[name]
            self.made[name] = warm_data(tuple(shape), np_dtype(as_torch_dtype(dt)))
        return self.made[name]

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def copy_out(outs: dict[str, Any], store: dict[str, torch.Tensor], pinned: Callable[[tuple, torch.dtype], torch.Tensor]
             ) -> dict[str, Any]:
    """Device outputs -> reused pinned buffers (``store``, grown as needed), queued on the current
    stream: the caller synchronizes before reading them."""
    host: dict[str, Any] = {}
    for k, v in outs.items():
        if not isinstance(v, torch.Tensor):
            host[k] = v
            continue
        need = v.numel() * v.element_size()
        pin = store.get(k)
        if pin is None or pin.numel() < need:
            pin = store[k] = pinned((max(need, 1),), torch.uint8)
        view = pin[:need].view(v.dtype).view(v.shape)
        view.copy_(v, non_blocking=True)
        host[k] = view
    return host


def stage_in(plan: "Plan", staging: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], rows: Optional[Rows]) -> None:
    """numpy -> pinned staging -> the plan's device buffers, queued on the current stream (the
    previous copy out of each staging buffer is done: every run ends by syncing the stream)."""
    for name, buf in plan.inputs.items():
        a = arrays[name]
        pin, dev = staging[name], buf
        if rows is not None and name in rows.inputs:
            ax = rows.inputs[name]
            pin, dev = pin.narrow(ax, 0, a.shape[ax]), dev.narrow(ax, 0, a.shape[ax])
        pin.copy_(torch_view(a).reshape(pin.shape))
        dev.copy_(pin, non_blocking=True)


class Slot:
    """Pinned host buffers for one staged run: inputs (the plan's shapes) and outputs."""

    def __init__(self, plan: "Plan", pinned: Callable[[tuple, torch.dtype], torch.Tensor]):
        self.inputs = {k: pinned(tuple(b.shape), b.dtype) for k, b in plan.inputs.items()}
        self.outputs: dict[str, torch.Tensor] = {}
        self.done: Any = None  # event recorded after the slot's outputs are copied out
        self.state = "idle"  # "staged" (handed to a caller), "submitted" (its run queued or done)
        self.released = True  # the caller is done with the outputs
        self.generation = 0  # bumped each time the slot is staged: a stale run's wait() is refused


def pick_slot(plan: "Plan", pinned: Callable[[tuple, torch.dtype], torch.Tensor]) -> Slot:
    """A slot free to stage: idle or released; else a new one (up to MAX_SLOTS); else the oldest
    submitted one (its caller had MAX_SLOTS - 1 runs to read it)."""
    free = [sl for sl in plan.slots if sl.state == "idle" or (sl.state == "submitted" and sl.released)]
    if free:
        slot = free[0]
    elif len(plan.slots) < MAX_SLOTS:
        slot = Slot(plan, pinned)
        plan.slots.append(slot)
    else:
        slot = next((sl for sl in plan.slots if sl.state == "submitted"), None)
        if slot is None:
            raise InputError(f"{MAX_SLOTS} runs of one shape are staged and none submitted: submit them")
    plan.slots.remove(slot)
    plan.slots.append(slot)
    if slot.done is not None:
        slot.done.synchronize()  # its last run's copies out of this memory are done
    slot.state, slot.released = "staged", False
    slot.generation += 1
    return slot


class StagedRun:
    """One run prepared for the server path: fill ``inputs`` (numpy views of pinned buffers, already
    cut to the run's rows), ``submit()`` (copies in, replays, copies out, all queued on the context's
    stream) and ``wait()`` for the outputs: numpy views of pinned buffers, valid until ``release()``,
    or until MAX_SLOTS more runs of the plan are staged."""

    def __init__(self, ctx: Any, plan: "Plan", rows: Optional[Rows], slot: Slot):
        self.ctx, self.plan, self.rows, self.slot = ctx, plan, rows, slot
        self.generation = slot.generation
        self.inputs: dict[str, np.ndarray] = {}
        for name, pin in slot.inputs.items():
            if rows is not None and name in rows.inputs:
                pin = pin.narrow(rows.inputs[name], 0, rows.n)
            self.inputs[name] = numpy_view(pin)
        self._outs: Optional[dict[str, Any]] = None

    def submit(self) -> None:
        self._check()
        self.ctx._submit(self)

    def wait(self) -> dict[str, np.ndarray]:
        self._check()
        if self._outs is None:
            raise InputError("wait() before submit()")
        if self.slot.done is not None:
            self.slot.done.synchronize()
        return {k: tensor_to_numpy(v) if isinstance(v, torch.Tensor) else to_numpy_value(v)
                for k, v in self._outs.items()}

    def release(self) -> None:
        """The caller is done with the outputs: the slot may be staged again at once."""
        if self.generation == self.slot.generation:
            self.slot.released = True

    def _check(self) -> None:
        if self.generation != self.slot.generation:
            raise InputError(f"this staged run's slot was staged again ({MAX_SLOTS} runs later): its buffers now "
                             "hold another run; read outputs before staging that many more runs")
