"""Shared pieces of the CLI: parsing --shapes/--input, loading a model or engine, random inputs."""
from __future__ import annotations

import difflib
import os
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from ..errors import EmberError, InputError

if TYPE_CHECKING:
    from rich.console import Console


# wide enough for any table; rich's default off a terminal is 80 columns, which cuts tables mid-word
UNBOUNDED_WIDTH = 1 << 15


def make_console(stderr: bool = False) -> "Console":
    """The rich Console every command prints through. On a terminal it fits the window; written to a
    pipe or a file (CI logs, `| less`, `> report.txt`) tables print in full rather than cut at 80
    columns. A COLUMNS set in the environment still wins."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=UNBOUNDED_WIDTH)
    return console


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


def load_engine_or_model(path: str, device: str = "auto", opt_level: "int | None" = None,
                         verify_key: "str | None" = None, allow_fallback: bool = False):
    """An .engine file is loaded (only if signed with the key in ``verify_key``, when given; with
    ``allow_fallback``, layers whose kernels cannot run here use the reference ones); anything else is
    built from ONNX in memory."""
    import ember
    from ..runtime.format import MANIFEST

    if _is_engine(path, MANIFEST):
        return ember.Engine.load(path, device=device, verify_key=verify_key, allow_fallback=allow_fallback)
    if verify_key:
        raise EmberError(f"--verify-key checks engine files, and {path} is not one: an ONNX model is built here, "
                         "not loaded. Build it with `ember build --sign-key`, or drop --verify-key")
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
    """--input name=file.npy | name=random | inputs.npz | file.npy; inputs not given are random."""
    feeds = read_inputs(input_args, {s.name: str(s) for s in engine.inputs})
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


def read_inputs(input_args: "tuple[str, ...] | list[str]", inputs: dict[str, str]) -> dict[str, np.ndarray]:
    """The arrays that --input arguments give, keyed by input name (inputs not given are left out).

    ``inputs`` maps each input name of the model to how it is shown in messages ("x: float32[batch,4]").
    NAME=FILE.npy binds one input; NAME=random asks for random data; a bare FILE.npy binds the
    model's only input; a bare FILE.npz binds its arrays by key. An .npz may carry arrays that are no
    input (labels beside the images): they are ignored with a note, unless some input is left without
    data, because then the key was most likely meant for it (a typo) and random data would be a silent
    wrong answer.
    """
    feeds: dict[str, np.ndarray] = {}
    random_names: set[str] = set()
    unmatched: dict[str, str] = {}  # .npz key that is no input -> the file it came from
    for arg in input_args:
        name, sep, value = arg.partition("=")
        if not sep:
            _read_bare_file(arg, inputs, feeds, unmatched)
            continue
        if name not in inputs:
            raise InputError(f"--input {arg}: the model has no input '{name}'{_did_you_mean(name, inputs)}; "
                             f"its inputs: {_listing(inputs)}")
        if value == "random":
            random_names.add(name)
            feeds.pop(name, None)
            continue
        feeds[name] = _read_one_array(arg, value)
    left = [n for n in inputs if n not in feeds and n not in random_names]
    if unmatched and left:
        raise InputError(_unmatched_message(unmatched, left, inputs))
    for key, path in unmatched.items():  # an .npz often carries labels beside the inputs
        click.echo(f"note: ignoring '{key}' from {path}: the model has no input of that name", err=True)
    return feeds


def _read_bare_file(arg: str, inputs: dict[str, str], feeds: dict[str, np.ndarray],
                    unmatched: dict[str, str]) -> None:
    if not os.path.isfile(arg):
        raise InputError(f"--input {arg}: no such file; write NAME=FILE.npy, NAME=random, FILE.npz "
                         f"(keyed by input name), or FILE.npy for a model with one input")
    loaded = _np_load(arg, arg)
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise InputError(f"--input {arg}: a bare .npy holds one array, and the model has {len(inputs)} "
                             f"inputs ({_listing(inputs)}); say which one it is: --input NAME={arg}, e.g. "
                             f"--input {next(iter(inputs), 'NAME')}={arg}")
        feeds[next(iter(inputs))] = loaded
        return
    with loaded as z:
        for key in z.files:
            if key in inputs:
                feeds[key] = z[key]
            else:
                unmatched[key] = arg


def _read_one_array(arg: str, path: str) -> np.ndarray:
    loaded = _np_load(arg, path)
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded as z:
        if len(z.files) == 1:
            return z[z.files[0]]
        raise InputError(f"--input {arg}: '{path}' is an .npz with {len(z.files)} arrays "
                         f"({', '.join(z.files) or 'none'}); give one array as NAME=FILE.npy, or pass the "
                         f".npz alone (--input {path}) to bind its arrays by key")


def _np_load(arg: str, path: str) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"--input {arg}: cannot read '{path}' as .npy or .npz ({e})") from None


def _listing(inputs: dict[str, str]) -> str:
    return ", ".join(inputs.values()) or "none"


def _did_you_mean(name: str, candidates: "dict[str, str] | list[str]") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unmatched_message(unmatched: dict[str, str], left: list[str], inputs: dict[str, str]) -> str:
    files = sorted(set(unmatched.values()))
    lines = [f"--input {', '.join(files)}: array(s) {', '.join(repr(k) for k in unmatched)} match no input of "
             f"the model, and input(s) {', '.join(repr(n) for n in left)} would get random data."]
    for name in left:
        close = difflib.get_close_matches(name, list(unmatched), n=1, cutoff=0.5)
        if close:
            lines.append(f"  did you mean '{close[0]}' for input '{name}'? Rename the key in "
                         f"{unmatched[close[0]]} (np.savez(path, {name}=array)) or pass --input {name}=FILE.npy")
    lines.append(f"  the model's inputs: {_listing(inputs)}")
    lines.append("  to run with random data for an input anyway, add --input NAME=random for it")
    return "\n".join(lines)


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
