"""The manifest's schema, checked in one place, so a malformed field is an EngineFileError naming the
field, never a TypeError or KeyError later in Engine.load.

Every field ember writes has its check here. A field that this ember does not know passes unchecked
(it is JSON data, and nothing here reads it); a newly written field gets its check here too.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

from ..errors import EngineFileError

MAX_DIM = 1 << 40
MAX_MEMBER_BYTES = 1 << 42  # 4 TiB: an absurd size is refused before it is compared with the archive
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_WORD = re.compile(r"[A-Za-z0-9_.+-]{1,32}\Z")
_CAPABILITY = re.compile(r"\d{1,3}\.\d{1,3}\Z")


class _Bad(Exception):
    """A field's problem; turned into an EngineFileError naming the field and the file."""

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def _type_name(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "array", str: "string", bool: "boolean",
                                     int: "integer", float: "number"}.get(type(v), type(v).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(field: str, v: Any, lo: int = 0, hi: int = MAX_DIM) -> int:
    if not _is_int(v):
        raise _Bad(field, f"must be an integer, not {_type_name(v)}")
    if not lo <= v <= hi:
        raise _Bad(field, f"is {v}, outside {lo}..{hi}")
    return v


def _number(field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _Bad(field, f"must be a finite non-negative number, not {v!r:.40}")
    return v


def _str(field: str, v: Any, max_len: int = 4096, pattern: "re.Pattern[str] | None" = None) -> str:
    if not isinstance(v, str):
        raise _Bad(field, f"must be a string, not {_type_name(v)}")
    if len(v) > max_len:
        raise _Bad(field, f"is {len(v)} characters long (at most {max_len})")
    if pattern is not None and not pattern.match(v):
        raise _Bad(field, f"is {v!r:.80}, not of the form {pattern.pattern}")
    return v


def _opt_str(field: str, v: Any, max_len: int = 4096) -> None:
    if v is not None:
        _str(field, v, max_len)


def _bool(field: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise _Bad(field, f"must be true or false, not {_type_name(v)}")


def _obj(field: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise _Bad(field, f"must be an object, not {_type_name(v)}")
    return v


def _list(field: str, v: Any, max_len: int = 1 << 20) -> list:
    if not isinstance(v, list):
        raise _Bad(field, f"must be an array, not {_type_name(v)}")
    if len(v) > max_len:
        raise _Bad(field, f"has {len(v)} entries (at most {max_len})")
    return v


def _str_list(field: str, v: Any) -> None:
    for i, s in enumerate(_list(field, v)):
        _str(f"{field}[{i}]", s)


def _dims(field: str, v: Any) -> list[int]:
    return [_int(f"{field}[{i}]", d) for i, d in enumerate(_list(field, v, 64))]


def _tensors(field: str, v: Any) -> list[str]:
    names = []
    for i, t in enumerate(_list(field, v, 1 << 16)):
        f = f"{field}[{i}]"
        t = _obj(f, t)
        for k in ("name", "dtype", "shape"):
            if k not in t:
                raise _Bad(f"{f}.{k}", "is missing")
        names.append(_str(f"{f}.name", t["name"], 1024))
        _str(f"{f}.dtype", t["dtype"], 32)
        for j, d in enumerate(_list(f"{f}.shape", t["shape"], 64)):
            if isinstance(d, str):
                _str(f"{f}.shape[{j}]", d, 256)
            else:
                _int(f"{f}.shape[{j}]", d)
    if len(set(names)) != len(names):
        raise _Bad(field, "names a tensor twice")
    return names


def _members(v: Any) -> None:
    for name, entry in _obj("members", v).items():
        f = f"members.{name}"
        entry = _obj(f, entry)
        if set(entry) != {"sha256", "size"}:
            raise _Bad(f, f"must have exactly the keys sha256 and size, not {sorted(entry)}")
        _str(f"{f}.sha256", entry["sha256"], 64, _HEX64)
        _int(f"{f}.size", entry["size"], 0, MAX_MEMBER_BYTES)


def _profiles(v: Any, inputs: list[str]) -> None:
    for i, p in enumerate(_list("profiles", v, 256)):
        for name, r in _obj(f"profiles[{i}]", p).items():
            f = f"profiles[{i}].{name}"
            if name not in inputs:
                raise _Bad(f, "names no input of the engine")
            r = _list(f, r)
            if len(r) != 3:
                raise _Bad(f, f"must be [min, opt, max], not {len(r)} shapes")
            lo, opt, hi = (_dims(f"{f}[{j}]", s) for j, s in enumerate(r))
            if not len(lo) == len(opt) == len(hi):
                raise _Bad(f, "min, opt and max shapes must have one rank")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise _Bad(f, f"must have min <= opt <= max in every dim, not {lo}, {opt}, {hi}")


def _build_host(v: Any) -> None:
    for k in ("platform", "python", "torch"):
        _opt_str(f"build_host.{k}", _obj("build_host", v).get(k), 512)
    gpu = v.get("gpu")
    if gpu is not None:
        _str("build_host.gpu.name", _obj("build_host.gpu", gpu).get("name"), 256)
        _str("build_host.gpu.capability", gpu.get("capability"), 16, _CAPABILITY)
        _opt_str("build_host.gpu.cuda", gpu.get("cuda"), 64)


def _source(v: Any) -> None:
    _opt_str("source.file", _obj("source", v).get("file"))
    if v.get("sha256") is not None:
        _str("source.sha256", v["sha256"], 64, _HEX64)


def _kernels(v: Any) -> None:
    _str("kernels.triton", _obj("kernels", v).get("triton"), 64)
    _int("kernels.count", v.get("count"), 0, 1 << 20)


def _counts(field: str, v: Any) -> None:
    for k, n in _obj(field, v).items():
        _int(f"{field}.{k}", n, 0, 1 << 40)


def _memory(field: str, v: Any) -> None:
    for k in ("activations_peak_mib", "activations_naive_mib", "weights_mib"):  # what is printed
        if _obj(field, v).get(k) is not None:
            _number(f"{field}.{k}", v[k])


def _shapes(field: str, v: Any) -> None:
    for k, s in _obj(field, v).items():
        _dims(f"{field}.{k}", s)


# optional fields: name -> check of the value (absent and null are both "not given")
_OPTIONAL: dict[str, Callable[[str, Any], Any]] = {
    "ember_version": lambda f, v: _str(f, v, 64),
    "torch_version": lambda f, v: _str(f, v, 64),
    "onnx_version": lambda f, v: _str(f, v, 64),
    "created": lambda f, v: _str(f, v, 64),
    "source": lambda f, v: _source(v),
    "backend": lambda f, v: _str(f, v, 32, _WORD),
    "device": lambda f, v: _str(f, v, 16, re.compile(r"(cpu|cuda)\Z")),
    "precision": lambda f, v: _str(f, v, 32, _WORD),
    "opt_level": lambda f, v: _int(f, v, 0, 9),
    "builder_level": lambda f, v: _int(f, v, 0, 9),
    "build_host": lambda f, v: _build_host(v),
    "memory": _memory,
    "static_shapes": _shapes,
    "tactics": _counts,
    "tactic_failures": lambda f, v: _str_list(f, v),
    "approximations": lambda f, v: _str_list(f, v),
    "fp32_layers": lambda f, v: _str_list(f, v),
    "nodes_in": lambda f, v: _int(f, v, 0, 1 << 40),
    "nodes_out": lambda f, v: _int(f, v, 0, 1 << 40),
    "allow_tf32": _bool,
    "kernels": lambda f, v: _kernels(v),
    "tuned_shapes": _shapes,  # the input shapes tactics were timed and memory planned at
    "fusion_groups": lambda f, v: _str_list(f, v),  # groups given a generated kernel at build (a loss at load is an error)
    "fidelity": _obj,  # the fp16/bf16 check's budget and drift (printed, never acted on)
    "quantization": _obj,  # INT8/FP8: calibration, layers quantized and kept, the accuracy budget (printed)
    "kind": lambda f, v: _str(f, v, 16, re.compile(r"(model|llm)\Z")),  # "llm": an LLM engine (ember.llm)
    "llm": _obj,
    "tactic_buckets": _obj,  # the dim and sizes tactics were also timed at (per node: graph.json, tactic_buckets.py)
}


def check_manifest(m: Any, path: str) -> dict[str, Any]:
    """Raise EngineFileError naming the first malformed field; returns ``m``. The format name and
    version are checked before this (format.py), the members' sizes and hashes after it."""
    try:
        m = _obj("manifest", m)
        for k in ("members", "inputs", "outputs"):
            if k not in m:
                raise _Bad(k, "is missing")
        _members(m["members"])
        inputs = _tensors("inputs", m["inputs"])
        _tensors("outputs", m["outputs"])
        for field, check in _OPTIONAL.items():
            if m.get(field) is not None:
                check(field, m[field])
        if m.get("profiles") is not None:
            _profiles(m["profiles"], inputs)
    except _Bad as e:
        raise EngineFileError(f"engine '{path}': manifest field '{e.field}' {e.problem}. The file is damaged or "
                              "was not written by ember; rebuild it with `ember build`.") from None
    return m


def field_error(path: str, field: str, problem: str) -> EngineFileError:
    """The error for a field whose problem shows only against the archive (a size, a count)."""
    return EngineFileError(f"engine '{path}': manifest field '{field}' {problem}. The file is damaged or was "
                           "not written by ember; rebuild it with `ember build`.")
