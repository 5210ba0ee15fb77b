"""What a build reports while it runs: a message that also carries its stage and counts.

``BuilderConfig.progress`` receives :class:`Progress` values. They are strings ("tuning 12/54
ember.Conv layer3.0.conv2"), so a callback written for text keeps working; a progress bar reads
``stage``, ``done`` and ``total`` (``ember build`` draws one per stage).
"""
from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Optional[Callable[[str], None]]


class Progress(str):
    """A progress message with its stage ('compile', 'tune', 'fidelity', ...) and counts."""

    stage: str
    done: int
    total: int
    item: str  # what is being worked on now (a node, a kernel), '' when nothing in particular

    def __new__(cls, stage: str, done: int, total: int, item: str = "") -> "Progress":
        verb = {"compile": "compiling kernels", "tune": "tuning", "fidelity": "checking fp16 fidelity",
                "precision": "choosing precisions"}.get(stage, stage)
        s = super().__new__(cls, f"{verb} {done}/{total}" + (f" {item}" if item else ""))
        s.stage, s.done, s.total, s.item = stage, done, total, item
        return s


def report(progress: ProgressFn, stage: str, done: int, total: int, item: str = "") -> None:
    if progress is not None:
        progress(Progress(stage, done, total, item))
