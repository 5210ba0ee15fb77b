"""Shared pieces of the CLI: parsing --shapes/--input, loading a model or engine, random inputs."""
from __future__ import annotations

import os
from typing import Any

import click
import numpy as np

from ..errors import EmberError, InputError


def parse_shapes(items: "tuple[str, ...] | list[str]") -> dict[str, tuple[int, ...]]:
    """'x:1x3x224x224' (several, or comma-separated) -> {'x': (1, 3, 224, 224)}."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, dims = part.rpartition(":")
            if not sep or not name:
                raise click.BadParameter(f"'{part}': write NAME:DIMxDIMx..., e.g. input:1x3x224x224")
            try:
                out[name] = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            except ValueError:
                raise click.BadParameter(f"'{part}': dims must be integers separated by 'x'") from None
    return out


def load_engine_or_model(path: str, device: str = "auto", opt_level: "int | None" = None):
    """An .engine file is loaded; anything else is built from ONNX in memory."""
    import ember
    from ..runtime.format import MANIFEST

    if _is_engine(path, MANIFEST):
        return ember.Engine.load(path, device=device)
    kwargs: dict[str, Any] = {"device": device}
    if opt_level is not None:
        kwargs["opt_level"] = opt_level
    return ember.build(path, **kwargs)


def _is_engine(path: str, manifest_name: str) -> bool:
    import zipfile

    if path.endswith(".engine"):
        return True
    if not os.path.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return manifest_name in z.namelist()
    except zipfile.BadZipFile:
        return False


def random_input(spec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random data for one input: normal floats; small non-negative ints; masks of ones."""
    from ..ir.dtypes import DType, to_numpy

    dt = DType.parse(spec.dtype)
    lname = spec.name.lower()
    if dt == DType.BOOL:
        return rng.random(shape) < 0.5
    if dt.is_float:
        return rng.standard_normal(shape).astype(to_numpy(dt))
    if "mask" in lname:
        return np.ones(shape, dtype=to_numpy(dt))
    hi = 2 if "type" in lname else 16
    return rng.integers(0, hi, size=shape).astype(to_numpy(dt))


def concrete_shape(spec, shapes: dict[str, tuple[int, ...]], bound: dict[str, int]) -> tuple[int, ...]:
    if spec.name in shapes:
        shape = shapes[spec.name]
        if len(shape) != len(spec.shape):
            raise InputError(f"--shapes gives {spec.name} rank {len(shape)}; the model's input is {spec}")
        for d, want in zip(shape, spec.shape):
            if isinstance(want, str):
                bound.setdefault(want, d)
        return shape
    out = []
    for d in spec.shape:
        out.append(d if isinstance(d, int) else bound.setdefault(d, 1))
    return tuple(out)


def make_feeds(engine, input_args: "tuple[str, ...]", shapes: dict[str, tuple[int, ...]],
               seed: int = 0) -> dict[str, np.ndarray]:
    """--input name=file.npy | name=random | inputs.npz; inputs not given are random."""
    feeds: dict[str, np.ndarray] = {}
    random_names: set[str] = set()
    names = {s.name for s in engine.inputs}
    for arg in input_args:
        name, sep, value = arg.partition("=")
        if not sep:
            if not os.path.isfile(arg):
                raise InputError(f"--input {arg}: no such file; write NAME=FILE.npy, NAME=random or FILE.npz")
            try:
                with np.load(arg, allow_pickle=False) as z:
                    if not hasattr(z, "files"):
                        raise InputError(f"--input {arg}: a bare file must be an .npz keyed by input name")
                    for k in z.files:
                        if k in names:
                            feeds[k] = z[k]
                        else:  # an .npz often carries labels beside the inputs
                            click.echo(f"note: ignoring '{k}' from {arg}: the model has no input of that name",
                                       err=True)
            except (ValueError, OSError) as e:
                raise InputError(f"--input {arg}: cannot read it as .npz ({e})") from None
            continue
        if name not in names:
            raise InputError(f"--input {arg}: the model has no input '{name}'; its inputs: "
                             + ", ".join(str(s) for s in engine.inputs))
        if value == "random":
            random_names.add(name)
            continue
        try:
            feeds[name] = np.load(value, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"--input {arg}: cannot read '{value}' as .npy ({e})") from None
    rng = np.random.default_rng(seed)
    bound: dict[str, int] = {}
    for spec in engine.inputs:  # bind symbolic dims from the arrays given
        if spec.name in feeds:
            for d, want in zip(np.shape(feeds[spec.name]), spec.shape):
                if isinstance(want, str):
                    bound.setdefault(want, int(d))
    for spec in engine.inputs:
        if spec.name not in feeds:
            feeds[spec.name] = random_input(spec, concrete_shape(spec, shapes, bound), rng)
    return feeds


def summarize(name: str, a: Any) -> list[str]:
    a = np.asarray(a)
    row = [name, str(a.dtype), "x".join(map(str, a.shape)) or "scalar"]
    if a.size and a.dtype.kind in "fiub":
        f = a.astype(np.float64)
        row += [f"{f.min():.5g}", f"{f.max():.5g}", f"{f.mean():.5g}"]
        n = 4 if a.dtype.kind == "f" else 16  # class ids read best in full
        flat = a.reshape(-1)[:n]
        row.append(", ".join(f"{x:.4g}" if a.dtype.kind == "f" else str(x) for x in flat)
                   + (" …" if a.size > n else ""))
    else:
        row += ["", "", "", ""]
    return row


def fail(msg: str) -> None:
    raise EmberError(msg)
