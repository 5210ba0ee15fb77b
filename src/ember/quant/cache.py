"""The calibration cache: a readable text file of activation ranges, valid for one graph.

    # ember calibration cache (one line per quantized tensor: its name and the range it clips at)
    format ember-calibration 1
    graph 5c1f0d4e9a...            (a hash of the optimized fp32 graph: structure and weights)
    type int8
    method entropy
    samples 512
    smooth_alpha none
    amax "conv1_input" 2.734e+00
    smooth "layer0.q_proj" 0.91,1.22,...

Names are JSON strings. A cache made for another graph (an edited model, another opt level), type,
method or smoothing is stale: the build calibrates again and rewrites it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .collect import Calibration
from .data import CalibrationError

log = logging.getLogger(__name__)
FORMAT = "ember-calibration 1"


def _alpha(a: "float | str | None") -> str:
    return "none" if a is None else a if isinstance(a, str) else repr(float(a))


def save(cal: Calibration, path: "str | os.PathLike") -> None:
    lines = ["# ember calibration cache (one line per quantized tensor: its name and the range it clips at)",
             f"format {FORMAT}", f"graph {cal.graph}", f"type {cal.qtype}", f"method {cal.method}",
             f"samples {cal.samples}", f"smooth_alpha {_alpha(cal.smooth_alpha)}"]
    lines += [f"amax {json.dumps(k)} {v!r}" for k, v in sorted(cal.amax.items())]
    lines += [f"smooth {json.dumps(k)} " + ",".join(repr(float(x)) for x in s) for k, s in sorted(cal.smooth.items())]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def load(path: "str | os.PathLike", graph: str, qtype: str, method: str,
         smooth_alpha: "float | str | None") -> Optional[Calibration]:
    """The cached calibration if the file exists and was made for this graph, type, method and
    smoothing; None (with a log line saying why) when it must be redone."""
    p = Path(path)
    if not p.is_file():
        return None
    header: dict[str, str] = {}
    amax: dict[str, float] = {}
    smooth: dict[str, np.ndarray] = {}
    try:
        for no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            key, _, rest = line.partition(" ")
            if key in ("amax", "smooth"):
                name, end = json.JSONDecoder().raw_decode(rest)
                value = rest[end:].strip()
                if key == "amax":
                    amax[name] = float(value)
                else:
                    smooth[name] = np.asarray([float(x) for x in value.split(",")], np.float32)
            else:
                header[key] = rest.strip()
    except (ValueError, json.JSONDecodeError) as e:
        raise CalibrationError(f"calibration cache '{p}' line {no} is malformed ({e}); delete the file to "
                               "calibrate again") from None
    want = {"format": FORMAT, "graph": graph, "type": qtype, "method": method,
            "smooth_alpha": _alpha(smooth_alpha)}
    stale = [k for k, v in want.items() if header.get(k) != v]
    if stale:
        log.info("calibration cache %s is stale (%s differ); calibrating again", p, ", ".join(stale))
        return None
    return Calibration(qtype, method, int(header.get("samples", 0)), graph, amax, smooth, smooth_alpha)
