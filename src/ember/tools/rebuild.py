"""`ember build MODEL --rebuild-from ENGINE`: the build options an engine's manifest records, as the
command-line values that would build it again (for another GPU, or after an upgrade).

The manifest records precision, optimization level, static shapes, profiles and device, and the
source model's file name and SHA-256. The model given must be that source (same SHA-256): a rebuild
from another model is refused with the equivalent explicit command, which the user may run on
purpose. A field the rebuild needs and the manifest lacks is an error naming the field.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import EmberError

# the build options that --rebuild-from takes from the manifest; giving one of them too is an error
RECORDED_OPTIONS = ("precision", "shapes", "min_shapes", "opt_shapes", "max_shapes", "opt_level", "builder_level")
PRECISION_FLAGS = {"fp32": "--fp32", "tf32": "--tf32", "fp16": "--fp16", "bf16": "--bf16"}


@dataclass
class RebuildOptions:
    """Command-line values of ``ember build`` that reproduce an engine's build."""

    precision: str
    opt_level: int
    builder_level: Optional[int]  # None: not recorded (engines before it was); the command's value is used
    device: str
    shapes: tuple[str, ...] = ()
    min_shapes: tuple[str, ...] = ()
    opt_shapes: tuple[str, ...] = ()
    max_shapes: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)  # what the user should know (unverifiable source, ...)

    def command(self, model: str, output: Optional[str] = None, builder_level: Optional[int] = None) -> str:
        """The explicit `ember build` command with these options."""
        parts = ["ember", "build", _quote(model)]
        if output:
            parts += ["-o", _quote(output)]
        parts += [PRECISION_FLAGS.get(self.precision, f"--{self.precision}"), "--device", self.device,
                  "--opt-level", str(self.opt_level)]
        level = self.builder_level if self.builder_level is not None else builder_level
        if level is not None:
            parts += ["--builder-level", str(level)]
        for flag, values in (("--shapes", self.shapes), ("--min-shapes", self.min_shapes),
                             ("--opt-shapes", self.opt_shapes), ("--max-shapes", self.max_shapes)):
            for v in values:
                parts += [flag, _quote(v)]
        return " ".join(parts)


def recorded_build_args(engine_path: str, model_path: str, given: set[str], builder_level: int, device: str,
                        console: Any) -> tuple:
    """For ``ember build --rebuild-from``: (precision, shapes, min_shapes, opt_shapes, max_shapes,
    opt_level, builder_level, device) as the command's parameters, from the engine's manifest; what
    it takes is printed on ``console`` (a rich Console).
    ``given``: the parameters set on the command line (a recorded one among them is an error; the
    device may be overridden, to rebuild a CUDA engine for the CPU or the other way)."""
    opts = rebuild_options(engine_path, model_path)
    recorded = set(RECORDED_OPTIONS) - ({"builder_level"} if opts.builder_level is None else set())
    clash = sorted(given & recorded)
    if clash:
        flags = ", ".join("the precision flag" if c == "precision" else "--" + c.replace("_", "-") for c in clash)
        raise EmberError(f"--rebuild-from takes the build options from '{engine_path}'; drop {flags}, or build "
                         f"without --rebuild-from:\n  {opts.command(model_path, builder_level=builder_level)}")
    if "device" in given:
        opts.device = device
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    for note in opts.notes:
        say(f"note: {note}")
    level = opts.builder_level if opts.builder_level is not None else builder_level
    say(f"rebuilding with the options of {engine_path}: {opts.command(model_path, builder_level=level)}")
    return (opts.precision, opts.shapes, opts.min_shapes, opts.opt_shapes, opts.max_shapes, opts.opt_level, level,
            opts.device)


def rebuild_options(engine_path: str, model_path: str) -> RebuildOptions:
    """The recorded options of ``engine_path``, after checking that ``model_path`` is its source."""
    from .raw_manifest import read_raw_manifest

    m, _, unreadable = read_raw_manifest(engine_path)
    if unreadable:
        raise EmberError(f"--rebuild-from: {unreadable}")
    opts = options_from_manifest(m, engine_path)
    _check_source(m, engine_path, model_path, opts)
    return opts


def options_from_manifest(m: dict[str, Any], engine_path: str = "ENGINE") -> RebuildOptions:
    def need(name: str, kind: type) -> Any:
        v = m.get(name)
        if v is None:
            raise EmberError(f"engine '{engine_path}': its manifest has no '{name}' field, which --rebuild-from "
                             f"needs; it was built by ember {m.get('ember_version', '?')}. Build it with explicit "
                             "options instead (`ember build MODEL --help`).")
        if not isinstance(v, kind) or isinstance(v, bool):
            raise EmberError(f"engine '{engine_path}': manifest field '{name}' is {v!r:.60}, not a {kind.__name__}")
        return v

    precision = need("precision", str)
    if precision not in PRECISION_FLAGS:
        raise EmberError(f"engine '{engine_path}': manifest field 'precision' is '{precision}'; `ember build` "
                         f"builds {', '.join(PRECISION_FLAGS)}. Upgrade ember to rebuild it.")
    device = need("device", str)
    opts = RebuildOptions(precision=precision, opt_level=need("opt_level", int), builder_level=None,
                          device="cuda" if device == "cuda" else "cpu")
    level = m.get("builder_level")
    if isinstance(level, int) and not isinstance(level, bool):
        opts.builder_level = level
    else:
        opts.notes.append("the manifest has no 'builder_level' field (engines record it from this ember on); "
                          "the --builder-level given is used")
    static = m.get("static_shapes") or {}
    if not isinstance(static, dict):
        raise EmberError(f"engine '{engine_path}': manifest field 'static_shapes' is not an object")
    opts.shapes = tuple(_shape_arg(n, d, f"static_shapes.{n}", engine_path) for n, d in static.items())
    profiles = m.get("profiles") or []
    if not isinstance(profiles, list):
        raise EmberError(f"engine '{engine_path}': manifest field 'profiles' is not a list")
    lo, opt, hi = [], [], []
    for i, p in enumerate(profiles):
        if not isinstance(p, dict) or not p:
            raise EmberError(f"engine '{engine_path}': manifest field 'profiles[{i}]' is not an object of inputs")
        for j, acc in enumerate((lo, opt, hi)):
            acc.append(",".join(_shape_arg(n, _range(r, f"profiles[{i}].{n}", engine_path)[j],
                                           f"profiles[{i}].{n}", engine_path) for n, r in p.items()))
    opts.min_shapes, opts.opt_shapes, opts.max_shapes = tuple(lo), tuple(opt), tuple(hi)
    return opts


def _check_source(m: dict[str, Any], engine_path: str, model_path: str, opts: RebuildOptions) -> None:
    src = m.get("source") if isinstance(m.get("source"), dict) else {}
    want = src.get("sha256")
    if not isinstance(want, str):
        opts.notes.append(f"the manifest records no source SHA-256 (field 'source.sha256'; the engine was built "
                          f"from a model in memory): '{model_path}' cannot be checked against it")
        return
    got = sha256_file(model_path)
    if got != want:
        name = src.get("file") or "?"
        raise EmberError(
            f"'{model_path}' is not the model engine '{engine_path}' was built from: its SHA-256 is {got[:16]}…, "
            f"the engine's source ({name}) has {want[:16]}…. Pass the source model, or build this one on purpose "
            f"with the same options:\n  {opts.command(model_path, builder_level=2)}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise EmberError(f"cannot read model '{path}': {e.strerror or e}") from None
    return h.hexdigest()


def _range(r: Any, field_name: str, engine_path: str) -> list:
    if not isinstance(r, list) or len(r) != 3:
        raise EmberError(f"engine '{engine_path}': manifest field '{field_name}' is not [min, opt, max]")
    return r


def _shape_arg(name: str, dims: Any, field_name: str, engine_path: str) -> str:
    """'x', [1, 3, 224] -> 'x:1x3x224' (what --shapes parses)."""
    if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise EmberError(f"engine '{engine_path}': manifest field '{field_name}' is {dims!r:.60}, not a list of "
                         "integer dims")
    if "," in name:
        raise EmberError(f"engine '{engine_path}': input '{name}' has a comma in its name, which --shapes cannot "
                         "express; build it with the Python API (ember.build(..., profiles=...))")
    return f"{name}:{'x'.join(map(str, dims))}"


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(os.fspath(s))
