"""Math modes per engine: TF32 and reduced-precision reductions apply to one engine's kernels only.

torch's switches (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``...)
are process-wide, and cuBLAS and cuDNN read them when a kernel is launched. An engine therefore sets
its mode only while it launches kernels: eager steps and CUDA-graph captures. A graph replay launches
what was captured and reads no switch, so replays need no mode at all.

Engines that want different modes take turns: a launch under one mode waits until the launches under
another mode in flight are done; engines with the same mode launch concurrently. Whoever waits gets
the next turn (a steady stream of one mode cannot starve another). The switches the process had are
restored when no engine is launching.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import EmberError


@dataclass(frozen=True)
class MathMode:
    """How an engine's fp32 math runs on the GPU."""

    tf32: bool = False  # fp32 GEMMs and convolutions on TF32 tensor cores (an engine built with --tf32)
    reduced_precision_reduction: bool = True  # cuBLAS may reduce fp16/bf16 split-K partials in 16 bits

    @classmethod
    def of_manifest(cls, manifest: dict) -> "MathMode":
        return cls(tf32=bool(manifest.get("allow_tf32", False)))

    def describe(self) -> str:
        return "tf32" if self.tf32 else "ieee fp32"


def _new_api() -> bool:
    """Whether the process set TF32 through torch's newer ``fp32_precision`` switches: reading the
    legacy ``allow_tf32`` then raises (torch >= 2.9), so ember uses the same API the process does."""
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        return False
    try:
        m.allow_tf32  # noqa: B018  (raises when the two APIs were mixed)
        torch.backends.cudnn.allow_tf32  # noqa: B018
        return False
    except RuntimeError:
        return True


def _read() -> tuple:
    m = torch.backends.cuda.matmul
    reduced = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    if _new_api():
        return ("new", m.fp32_precision, torch.backends.cudnn.conv.fp32_precision) + reduced
    return ("legacy", m.allow_tf32, torch.backends.cudnn.allow_tf32) + reduced


def _write(state: tuple) -> None:
    m = torch.backends.cuda.matmul
    if state[0] == "new":
        m.fp32_precision, torch.backends.cudnn.conv.fp32_precision = state[1], state[2]
    else:
        m.allow_tf32, torch.backends.cudnn.allow_tf32 = state[1], state[2]
    m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = state[3], state[4]


def _state(mode: MathMode, like: tuple) -> tuple:
    """The switches of ``mode``, spelled in the API the process uses (``like``: what was read)."""
    if like[0] == "new":
        p = "tf32" if mode.tf32 else "ieee"
        return ("new", p, p, mode.reduced_precision_reduction, mode.reduced_precision_reduction)
    return ("legacy", mode.tf32, mode.tf32, mode.reduced_precision_reduction, mode.reduced_precision_reduction)


class _Turns:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active: Optional[MathMode] = None
        self.count = 0
        self.queue: list[MathMode] = []  # modes waiting for a turn, oldest first
        self.saved: Optional[tuple] = None
        self.local = threading.local()

    def enter(self, mode: MathMode) -> None:
        held = getattr(self.local, "held", None)
        if held is not None:
            if held[0] != mode:
                raise EmberError(f"an engine with math mode {mode.describe()} was run from inside a run of an "
                                 f"engine with math mode {held[0].describe()}; run them one after the other")
            held[1] += 1
            return
        with self.cond:
            try:
                if self.active != mode or self.queue:
                    self.queue.append(mode)
                    try:
                        while not (self.queue[0] == mode and (self.count == 0 or self.active == mode)):
                            self.cond.wait()
                    finally:
                        self.queue.remove(mode)
                if self.count == 0:
                    if self.saved is None:
                        self.saved = _read()
                    _write(_state(mode, self.saved))
                    self.active = mode
                self.count += 1
            finally:
                self.cond.notify_all()  # others of this mode may follow now; waiters re-check on errors
        self.local.held = [mode, 1]

    def exit(self) -> None:
        held = self.local.held
        held[1] -= 1
        if held[1]:
            return
        self.local.held = None
        with self.cond:
            self.count -= 1
            if self.count == 0:
                if not self.queue:
                    _write(self.saved)
                    self.saved = None
                self.active = None
                self.cond.notify_all()


_TURNS = _Turns()


@contextlib.contextmanager
def applied(mode: Optional[MathMode], device: "torch.device | None" = None) -> Iterator[None]:
    """Run the block with ``mode``'s switches set (a no-op off CUDA or without a mode)."""
    if mode is None or (device is not None and device.type != "cuda"):
        yield
        return
    _TURNS.enter(mode)
    try:
        yield
    finally:
        _TURNS.exit()


__all__ = ["MathMode", "applied"]
