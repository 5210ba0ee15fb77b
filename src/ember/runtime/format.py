"""The engine file: a zip of manifest.json, graph.json and weights.safetensors (and, for CUDA
engines, compiled Triton kernels under kernels/).

Loading parses JSON and safetensors, checks checksums and versions, and never unpickles or runs
Python from the file. The kernel binaries are the one executable content: they are checksummed and
handed to Triton's cache only when the GPU and Triton version match the build (kernel_store.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import EngineFileError
from ..ir.graph import Graph
from ..ir.serialize import FormatError, graph_from_json, graph_to_json
from ..ops.torch_types import tensor_from_numpy, tensor_to_numpy

FORMAT_NAME = "ember-engine"
FORMAT_VERSION = 1
MANIFEST, GRAPH, WEIGHTS = "manifest.json", "graph.json", "weights.safetensors"


@dataclass
class EngineFile:
    manifest: dict[str, Any]
    graph: Graph
    weights: dict[str, torch.Tensor]  # "const/<name>" and "attr/..." tensors, on CPU


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def write_engine(path: "str | os.PathLike", graph: Graph, manifest: dict[str, Any],
                 extra: "dict[str, bytes] | None" = None) -> int:
    """Write the engine; returns its size in bytes. Writes to a temp file first, then renames.
    ``extra``: further members (compiled kernels under ``kernels/``), checksummed like the rest."""
    obj, arrays = graph_to_json(graph)
    graph_bytes = json.dumps(obj, separators=(",", ":")).encode()
    tensors = {k: tensor_from_numpy(v).contiguous() for k, v in arrays.items()}
    weights_bytes = st_save(tensors) if tensors else st_save({})
    manifest = dict(manifest)
    manifest.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                     "checksums": {GRAPH: _sha256(graph_bytes), WEIGHTS: _sha256(weights_bytes),
                                   **{k: _sha256(v) for k, v in (extra or {}).items()}}})
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # concurrent saves must not share it
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(MANIFEST, json.dumps(manifest, indent=2))
        z.writestr(GRAPH, graph_bytes)
        z.writestr(WEIGHTS, weights_bytes)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_manifest(path: "str | os.PathLike") -> dict[str, Any]:
    with _open(path) as z:
        return _manifest(z, os.fspath(path))


def _open(path: "str | os.PathLike") -> zipfile.ZipFile:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise EngineFileError(f"engine file '{path}' does not exist")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise EngineFileError(
            f"'{path}' is not an ember engine (not a zip archive, or truncated). "
            "Rebuild it with `ember build`; if you meant an ONNX model, pass the .onnx file.") from None


def _member(z: zipfile.ZipFile, name: str, path: str) -> bytes:
    try:
        return z.read(name)
    except KeyError:
        raise EngineFileError(f"engine '{path}' has no {name}: it is damaged or not an ember engine; rebuild it") from None
    except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as e:
        raise EngineFileError(f"engine '{path}': {name} cannot be read ({e}); the file is damaged, rebuild it") from None
    except Exception as e:  # zlib errors and CRC mismatches surface under several types
        raise EngineFileError(f"engine '{path}': {name} is damaged ({type(e).__name__}: {e}); rebuild it") from None


def _manifest(z: zipfile.ZipFile, path: str) -> dict[str, Any]:
    try:
        m = json.loads(_member(z, MANIFEST, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineFileError(f"engine '{path}': manifest.json is not valid JSON ({e}); rebuild the engine") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise EngineFileError(f"'{path}' is not an ember engine (manifest format is {m.get('format') if isinstance(m, dict) else m!r})")
    v = m.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise EngineFileError(
            f"engine '{path}' uses engine format version {v}; this ember reads version {FORMAT_VERSION}. "
            f"It was built by ember {m.get('ember_version', '?')}: upgrade ember, or rebuild the engine with this one.")
    return m


def read_members(path: "str | os.PathLike", manifest: dict[str, Any], prefix: str) -> dict[str, bytes]:
    """The members under ``prefix`` (e.g. compiled kernels), each checked against the manifest's checksum."""
    path = os.fspath(path)
    sums = manifest.get("checksums", {})
    out: dict[str, bytes] = {}
    with _open(path) as z:
        for name in z.namelist():
            if name.startswith(prefix):
                data = _member(z, name, path)
                if sums.get(name) != _sha256(data):
                    raise EngineFileError(f"engine '{path}': the checksum of {name} does not match the manifest — "
                                          "the file was modified or damaged after it was built. Rebuild it.")
                out[name] = data
    return out


def read_engine(path: "str | os.PathLike") -> EngineFile:
    path = os.fspath(path)
    with _open(path) as z:
        manifest = _manifest(z, path)
        graph_bytes = _member(z, GRAPH, path)
        weights_bytes = _member(z, WEIGHTS, path)
    sums = manifest.get("checksums", {})
    for name, data in ((GRAPH, graph_bytes), (WEIGHTS, weights_bytes)):
        if sums.get(name) != _sha256(data):
            raise EngineFileError(
                f"engine '{path}': the checksum of {name} does not match the manifest — the file was modified "
                "or damaged after it was built. Rebuild it with `ember build`.")
    try:
        weights = st_load(weights_bytes)
    except Exception as e:
        raise EngineFileError(f"engine '{path}': weights.safetensors cannot be read ({e}); rebuild the engine") from None
    arrays = {k: tensor_to_numpy(t) for k, t in weights.items()}
    try:
        graph = graph_from_json(json.loads(graph_bytes), arrays)
    except (FormatError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineFileError(f"engine '{path}': graph.json is invalid ({e}); rebuild the engine") from None
    return EngineFile(manifest, graph, weights)


