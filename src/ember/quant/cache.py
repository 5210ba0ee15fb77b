"""The calibration cache: a readable text file of activation ranges, valid for one graph.

    # ember calibration cache (one line per quantized tensor: its name and the range it clips at)
    format ember-calibration 2
    graph 5c1f0d4e9a...            (a hash of the optimized fp32 graph: structure and weights)
    data 9b0e41c7d2...             (the calibration data: its files' names, sizes and times, or a digest of
                                    its arrays, with the sample limit and batch size it was read with)
    type int8
    method entropy
    samples 512                    (the samples it saw)
    smooth_alpha none
    amax "conv1_input" 2.734e+00
    smooth "layer0.q_proj" 0.91,1.22,...

Names are JSON strings. A cache made for another graph (an edited model, another opt level), other
data (other files, edited files, another --calib-samples), type, method or smoothing is stale: the
build says so in its log, calibrates again and rewrites it. A damaged file is an error naming it.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .collect import Calibration
from .data import CalibrationError

log = logging.getLogger(__name__)
FORMAT = "ember-calibration 2"


def _alpha(a: "float | str | None") -> str:
    return "none" if a is None else a if isinstance(a, str) else repr(float(a))


def save(cal: Calibration, path: "str | os.PathLike") -> None:
    lines = ["# ember calibration cache (one line per quantized tensor: its name and the range it clips at)",
             f"format {FORMAT}", f"graph {cal.graph}", f"data {cal.data or 'unknown'}", f"type {cal.qtype}",
             f"method {cal.method}",
             f"samples {cal.samples}", f"smooth_alpha {_alpha(cal.smooth_alpha)}"]
    lines += [f"amax {json.dumps(k)} {v!r}" for k, v in sorted(cal.amax.items())]
    lines += [f"smooth {json.dumps(k)} " + ",".join(repr(float(x)) for x in s) for k, s in sorted(cal.smooth.items())]
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, p)
    except OSError as e:
        raise CalibrationError(f"calibration cache '{p}' cannot be written ({e}); give --calib-cache a file in a "
                               "writable folder") from None


def load(path: "str | os.PathLike", graph: str, qtype: str, method: str,
         smooth_alpha: "float | str | None", data: Optional[str] = None) -> Optional[Calibration]:
    """The cached calibration if the file exists and was made for this graph, data (when ``data`` is
    given), type, method and smoothing; None (with a log warning saying what differs) when it must be
    redone. A damaged file is a CalibrationError naming it and the line."""
    p = Path(path)
    if p.is_dir():
        raise CalibrationError(f"calibration cache '{p}' is a folder; give --calib-cache a file name")
    if not p.is_file():
        return None
    header: dict[str, str] = {}
    amax: dict[str, float] = {}
    smooth: dict[str, np.ndarray] = {}
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"calibration cache '{p}' cannot be read ({e}); delete the file to calibrate "
                               "again") from None
    no = 0
    try:
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            key, _, rest = line.partition(" ")
            if key in ("amax", "smooth"):
                name, end = json.JSONDecoder().raw_decode(rest)
                if not isinstance(name, str):
                    raise ValueError(f"the tensor name {name!r} is not a string")
                value = rest[end:].strip()
                if key == "amax":
                    amax[name] = float(value)
                    if not (math.isfinite(amax[name]) and amax[name] >= 0):
                        raise ValueError(f"the range {value} is not a finite number >= 0")
                else:
                    smooth[name] = np.asarray([float(x) for x in value.split(",")], np.float32)
                    if not (np.isfinite(smooth[name]).all() and (smooth[name] > 0).all()):
                        raise ValueError("a smoothing factor is not a finite number > 0")
            elif key == "samples":
                header[key] = str(int(rest))
            else:
                header[key] = rest.strip()
    except ValueError as e:  # json.JSONDecodeError is one
        raise CalibrationError(f"calibration cache '{p}' line {no} is malformed ({e}); delete the file to "
                               "calibrate again") from None
    want = {"format": FORMAT, "graph": graph, "type": qtype, "method": method,
            "smooth_alpha": _alpha(smooth_alpha)}
    if data is not None:
        want["data"] = data
    stale = [k for k, v in want.items() if header.get(k) != v]
    if stale:
        log.warning("calibration cache %s was made for another %s (%s); calibrating again and rewriting it", p,
                    ", ".join(stale), "; ".join(f"{k}: cached {header.get(k, 'none')}, now {want[k]}" for k in stale))
        return None
    return Calibration(qtype, method, int(header.get("samples", 0)), graph, amax, smooth, smooth_alpha,
                       data=header.get("data", ""))
