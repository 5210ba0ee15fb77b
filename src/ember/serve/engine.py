"""Where serve meets the ember engine API (with instance.py, which runs it). If that API moves, fix
it here.

An EngineAdapter loads `model.engine` (or builds `model.onnx` and caches the engine) and reports
its inputs/outputs in KServe terms. Each model instance (instance.py) runs it through an
ExecutionContext of its own, on the instance's threads, never on the event loop.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmberError, InputError
from .datatypes import NUMPY_NAME_TO_KSERVE
from .errors import BadRequestError, InferenceFailedError, RepositoryError

log = logging.getLogger("ember.serve")

ENGINE_FILENAMES = ("model.engine", "model.onnx")
MODEL_SUFFIXES = (".engine", ".onnx")  # what a version folder's model file may be called otherwise


@dataclass(frozen=True)
class EngineIO:
    name: str
    datatype: str  # KServe name
    shape: tuple[int, ...]  # full engine shape, -1 for symbolic dims


def _io(spec: Any) -> EngineIO:
    dtype = str(spec.dtype).replace("torch.", "")
    datatype = NUMPY_NAME_TO_KSERVE.get(dtype)
    if datatype is None:
        raise RepositoryError(f"engine tensor '{spec.name}' has dtype {dtype!r}, which KServe cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape)
    return EngineIO(spec.name, datatype, shape)


def find_model_file(version_dir: Path, preferred: str | None) -> Path:
    """The file a model version serves: ``preferred`` (the config's default_model_filename), else
    model.engine, else model.onnx, else the one .engine or .onnx file of the folder, whatever its
    name (`cp digits_cnn.onnx models/digits/1/` serves as it is)."""
    names = ([preferred] if preferred else []) + [n for n in ENGINE_FILENAMES if n != preferred]
    for name in names:
        path = version_dir / name
        if path.is_file():
            return path
    try:
        present = sorted(p for p in version_dir.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise RepositoryError(f"{version_dir}: cannot list the version folder ({e.strerror or e})") from None
    candidates = [p for p in present if p.suffix.lower() in MODEL_SUFFIXES and p.is_file()]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise RepositoryError(
            f"{version_dir}: {len(candidates)} model files ({', '.join(p.name for p in candidates)}) and none "
            f"named {' or '.join(names)}; a version serves one: remove the others, rename the one to serve "
            "model.engine or model.onnx, or name it in the model's config (default_model_filename)")
    found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in present[:10]) + (" ..." if len(present) > 10 else "")
    raise RepositoryError(f"{version_dir}: no model file (found: {found or 'nothing'}); put one .engine or .onnx "
                          f"file in the version folder (ember build model.onnx -o {version_dir / 'model.engine'})")


def _source_digest(version_dir: Path, onnx_file: Path, options: dict[str, Any]) -> str:
    """Hash of every file in the version folder (external weights included), the build options and
    the ember version."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    try:
        h.update(version("ember").encode())
    except PackageNotFoundError:
        h.update(b"ember-dev")
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file() and p.suffix != ".engine"):
        h.update(str(path.relative_to(version_dir)).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(onnx_file.name.encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


class EngineAdapter:
    """Wraps an `ember.Engine` for serving."""

    def __init__(self, engine: Any, path: Path):
        self.engine = engine
        self.path = path
        self.inputs = [_io(s) for s in engine.inputs]
        self.outputs = [_io(s) for s in engine.outputs]
        self.device = str(getattr(engine, "device", "cpu"))
        graph = getattr(engine, "graph", None)
        # the staged path carries tensors only (the context's rule for stage())
        self.tensor_io = graph is not None and all(getattr(v, "kind", "tensor") == "tensor"
                                                   for v in (*graph.inputs, *graph.outputs))
        self.bf16_inputs = frozenset(io.name for io in self.inputs if io.datatype == "BF16")
        self.stage_dtypes = {s.name: _stage_dtype(str(s.dtype).replace("torch.", "")) for s in engine.inputs}

    @classmethod
    def load(cls, version_dir: Path, preferred: str | None, cache_dir: Path | None, label: str,
             build_options: dict[str, Any] | None = None, verify_key: bytes | None = None) -> "EngineAdapter":
        """Load the engine of one model version; an ONNX file is built (with `build_options` as
        ember.build keyword arguments) once and cached. With `verify_key`, a model.engine must be
        signed with it, and cached engines are signed with it too."""
        path = find_model_file(version_dir, preferred)
        try:
            import ember
        except ImportError as e:  # pragma: no cover - ember itself is broken
            raise RepositoryError(f"{label}: cannot import ember: {e}") from e
        try:
            if path.suffix != ".onnx":
                return cls(ember.Engine.load(str(path), verify_key=verify_key), path)
            return cls(cls._build_cached(ember, path, version_dir, cache_dir, label, build_options or {}, verify_key),
                       path)
        except EmberError as e:
            raise RepositoryError(f"{label}: {path}: {e}") from e
        except (OSError, ValueError, RuntimeError) as e:
            raise RepositoryError(f"{label}: failed to load {path}: {type(e).__name__}: {e}") from e

    @staticmethod
    def _build_cached(ember: Any, onnx_path: Path, version_dir: Path, cache_dir: Path | None, label: str,
                      options: dict[str, Any], verify_key: bytes | None = None) -> Any:
        cached = None
        if cache_dir is not None:
            digest = _source_digest(version_dir, onnx_path, options)
            cached = cache_dir / f"{label.replace('/', '_')}-{digest}.engine"
            if cached.is_file():
                try:
                    log.info("%s: using cached engine %s", label, cached)
                    return ember.Engine.load(str(cached), verify_key=verify_key)
                except EmberError as e:
                    log.warning("%s: cached engine %s is unusable (%s); rebuilding", label, cached, e)
        log.info("%s: building engine from %s", label, onnx_path)
        engine = ember.build(str(onnx_path), **options)
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                engine.save(str(tmp), sign_key=verify_key)  # the cache is checked like any engine
                os.replace(tmp, cached)
            except (OSError, EmberError) as e:
                log.warning("%s: could not cache the engine in %s (%s); it will be rebuilt next load", label,
                            cache_dir, e)
        return engine

    # ---- running --------------------------------------------------------------------------------------

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once through the calling thread's context (Engine.run). Raises BadRequestError for input
        problems, InferenceFailedError otherwise. Model instances use instance.EngineInstance."""
        feed = {io.name: bf16_tensor(inputs[io.name]) if io.datatype == "BF16" else inputs[io.name]
                for io in self.inputs}
        try:
            out = self.engine.run(feed)
        except InputError as e:
            raise BadRequestError(str(e)) from e
        except Exception as e:  # the engine is not ours to trust: report it, keep serving
            raise InferenceFailedError(f"engine {self.path} failed: {type(e).__name__}: {e}") from e
        return {k: kserve_array(v) for k, v in out.items()}


def _stage_dtype(name: str) -> Any:
    """The numpy dtype of an engine input as ExecutionContext.run sees it (bfloat16: ml_dtypes'), so
    staged runs and run() share plans."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError:  # not a tensor dtype: such an engine is not staged (tensor_io)
        return None


def bf16_tensor(arr: np.ndarray) -> Any:
    """KServe BF16 (uint16 bits) -> a torch.bfloat16 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)


def kserve_array(v: Any) -> np.ndarray:
    """An engine output as the array KServe sends: numpy, BF16 as its uint16 bits."""
    if isinstance(v, np.ndarray):
        return v.view(np.uint16) if v.dtype.name == "bfloat16" else v
    try:
        import torch
    except ImportError:  # pragma: no cover
        return np.asarray(v)
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    return np.asarray(v)
