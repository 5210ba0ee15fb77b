"""Every engine the test suite builds round-trips: saved, loaded again, and run on the same inputs,
with identical outputs (bitwise on the same device; NaN where NaN).

``install()`` (called once by tests/conftest.py) wraps ``ember.builder.build`` so that every engine it
returns is tracked, and wraps the run entry points (``Engine.run``, ``ExecutionContext.run`` and
``run_device``, ``Interpreter.run``): after the outermost run of a tracked engine returns, its twin,
the engine saved to a temp file and loaded from it (once per engine), runs on the same inputs the same
way, and the outputs must be identical. ``track(engine)`` adds an engine built another way (the
node-conformance runner wraps each imported test graph in one).

Engines with ops that are random by design are exempt, by op: ``NONDETERMINISTIC_OPS``.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
import weakref
from typing import Any, Callable, Optional

import numpy as np
import torch

NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})
STATS = {"engines": 0, "runs": 0, "exempt": 0}

_state = threading.local()  # .depth: > 0 inside a wrapped run (nested calls and twin runs pass through)
_dir: Optional[str] = None


class _Twin:
    """A tracked engine's loaded copy, made on its first run; contexts get twin contexts."""

    def __init__(self, engine: Any):
        self.engine = lambda: engine  # a strong reference: the interpreter alone may be what the test keeps
        self.lock = threading.Lock()
        self.loaded: Any = None
        self.contexts: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
        self.exempt = sorted(_ops(engine.graph) & NONDETERMINISTIC_OPS)

    def twin(self) -> Any:
        with self.lock:
            if self.loaded is None:
                from ember.runtime.engine import Engine

                engine = self.engine()
                path = os.path.join(_tmpdir(), f"{id(self)}.engine")
                try:
                    engine.save(path)
                    self.loaded = Engine.load(path, device=engine._interp.device)
                except Exception as e:
                    raise AssertionError(f"round trip: the built engine could not be saved and loaded again: "
                                         f"{type(e).__name__}: {e}") from e
                finally:
                    if os.path.exists(path):
                        os.remove(path)
                STATS["engines"] += 1
            return self.loaded

    def context(self, ctx: Any) -> Any:
        twin = self.twin()
        with self.lock:
            tc = self.contexts.get(ctx)
            if tc is None:
                args, kwargs = getattr(ctx, "_roundtrip_args", ((), {}))
                tc = self.contexts[ctx] = type(ctx)(twin, *args, **kwargs)
            return tc


def _ops(graph: Any) -> set[str]:
    out = set()
    for n in graph.nodes:
        out.add(n.op)
        for g in n.subgraphs():
            out |= _ops(g)
    return out


def _tmpdir() -> str:
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="ember-roundtrip-")
    return _dir


def cleanup() -> None:
    if _dir is not None:
        shutil.rmtree(_dir, ignore_errors=True)


def track(engine: Any) -> Any:
    """Round-trip this engine on each of its runs. Returns it."""
    interp = getattr(engine, "_interp", None)
    assert interp is not None, "round trip: Engine has no _interp; update tests/roundtrip.py to the new run path"
    engine._roundtrip = interp._roundtrip = _Twin(engine)
    return engine


# -- comparing ------------------------------------------------------------------------------------
def _as_tensor(x: Any) -> Any:
    if isinstance(x, np.ndarray) or np.isscalar(x):
        a = np.asarray(x)
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16) if a.dtype.name == "bfloat16" else \
            torch.from_numpy(np.ascontiguousarray(a))
    return x


def _same(a: Any, b: Any, where: str) -> None:
    a, b = _as_tensor(a), _as_tensor(b)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: sequence of {len(a)} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
        return
    if not isinstance(a, torch.Tensor):
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"
        return
    assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, \
        f"{where}: {a.dtype}{list(a.shape)} on {a.device} vs {b.dtype}{list(b.shape)} on {b.device}"
    if a.is_floating_point() or a.is_complex():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        assert torch.equal(nan_a, nan_b), f"{where}: NaN at different positions"
        a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
        if a.is_floating_point():
            a, b = a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()])  # -0.0 is not 0.0
    if not torch.equal(a, b):
        diff = (a != b).nonzero()
        first = tuple(diff[0].tolist()) if len(diff) else ()
        raise AssertionError(f"{where}: {len(diff)} of {a.numel()} elements differ, first at {first}: "
                             f"{_show(a, first)} vs {_show(b, first)}")


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _show(t: torch.Tensor, at: tuple) -> str:
    return repr(t[at].item()) if t.dim() else repr(t.item())


def _compare(out: Any, again: Any, engine: Any) -> None:
    try:
        if isinstance(out, dict):
            assert isinstance(again, dict) and list(out) == list(again), f"outputs {list(out)} vs {list(again)}"
            for k in out:
                _same(out[k], again[k], f"output '{k}'")
        else:
            _same(out, again, "outputs")
    except AssertionError as e:
        raise AssertionError(f"round trip: the engine saved and loaded again gives other outputs than the "
                             f"built one ({engine.graph.name}, {len(engine.graph.nodes)} nodes): {e}") from None
    STATS["runs"] += 1


# -- wrapping the entry points --------------------------------------------------------------------
def _wrap(cls: type, name: str, twin_of: Callable[[Any], Optional[_Twin]],
          rerun: Callable[[_Twin, Any, tuple, dict], Any]) -> None:
    orig = getattr(cls, name)
    if getattr(orig, "_roundtrip", False):
        return

    @functools.wraps(orig)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_state, "depth", 0):
            return orig(self, *args, **kwargs)
        _state.depth = 1
        try:
            out = orig(self, *args, **kwargs)
            rt = twin_of(self)
            if rt is None or rt.exempt or _capturing():
                if rt is not None and rt.exempt:
                    STATS["exempt"] += 1
                return out
            _compare(out, rerun(rt, self, args, kwargs), rt.engine())
            return out
        finally:
            _state.depth = 0

    wrapper._roundtrip = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapper)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def install() -> None:
    """Track every engine ``ember.builder.build`` returns, and check the runs of tracked engines."""
    import ember.builder
    import ember.builder.builder as builder_module
    from ember.runtime.context import ExecutionContext
    from ember.runtime.engine import Engine
    from ember.runtime.interpreter import Interpreter

    build = builder_module.build
    if not getattr(build, "_roundtrip", False):
        @functools.wraps(build)
        def tracked_build(*args: Any, **kwargs: Any) -> Any:
            return track(build(*args, **kwargs))

        tracked_build._roundtrip = True  # type: ignore[attr-defined]
        builder_module.build = ember.builder.build = tracked_build

    init = ExecutionContext.__init__
    if not getattr(init, "_roundtrip", False):
        @functools.wraps(init)
        def recording_init(self: Any, engine: Any, *args: Any, **kwargs: Any) -> None:
            init(self, engine, *args, **kwargs)
            self._roundtrip_args = (args, kwargs)  # a twin context is made the same way

        recording_init._roundtrip = True  # type: ignore[attr-defined]
        ExecutionContext.__init__ = recording_init

    _wrap(Engine, "run", lambda e: e.__dict__.get("_roundtrip"),
          lambda rt, e, a, k: rt.twin().run(*a, **k))
    _wrap(ExecutionContext, "run", lambda c: c.engine.__dict__.get("_roundtrip"),
          lambda rt, c, a, k: rt.context(c).run(*a, **k))
    _wrap(ExecutionContext, "run_device", lambda c: c.engine.__dict__.get("_roundtrip"),
          lambda rt, c, a, k: rt.context(c).run_device(*a, **k))
    _wrap(Interpreter, "run", lambda i: i.__dict__.get("_roundtrip"),
          lambda rt, i, a, k: rt.twin()._interp.run(*a, **k))
