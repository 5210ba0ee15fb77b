"""Compiled Triton kernels travel inside the engine file, so loading never compiles.

The builder runs the finished engine once at the profile's opt shapes while recording the
compiled kernels its launches return; at save their binaries (cubin + metadata JSON) are stored
under ``kernels/<hash>/``. At load, on the same GPU
architecture and Triton version, they are written into Triton's own cache under the same hashes
(what Triton would have written after compiling them), so the first launch of each kernel is a
cache hit: no PTX generation, no ptxas. A different Triton version simply recompiles (its cache
keys differ): slower first run, never wrong.

Triton computes one hash over its own installation on the first launch in a process (about
0.3 s on the H200 machine); :func:`prewarm` does that on a thread while the weights load.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)
PREFIX = "kernels/"
_KEEP_EXT = (".json", ".cubin", ".hsaco")  # metadata and the binary: all a cache hit reads


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


_RECORDING: Optional[dict[str, Any]] = None


def note(kernel: Any) -> None:
    """Called with what a Triton launch returns (its compiled kernel): kept while recording."""
    if _RECORDING is not None and kernel is not None and getattr(kernel, "hash", None):
        _RECORDING[kernel.hash] = kernel


@contextlib.contextmanager
def recording() -> Iterator[dict[str, Any]]:
    """Collect the compiled kernels launched inside the block: hash -> compiled kernel."""
    global _RECORDING
    outer, _RECORDING = _RECORDING, {}
    try:
        yield _RECORDING
    finally:
        got, _RECORDING = _RECORDING, outer
        if outer is not None:
            outer.update(got)


def members(kernels: dict[str, Any]) -> dict[str, bytes]:
    """``kernels/<hash>/<file>`` -> bytes (metadata JSON and binary) of recorded compiled kernels."""
    out: dict[str, bytes] = {}
    for h, k in kernels.items():
        group = getattr(k, "metadata_group", None)
        if not isinstance(group, dict):
            continue
        files = {}
        for fname, path in group.items():
            if fname.endswith(_KEEP_EXT):
                try:
                    with open(path, "rb") as f:
                        files[fname] = f.read()
                except OSError:
                    files = {}
                    break
        if any(f.endswith(".json") for f in files) and len(files) >= 2:
            for fname, data in files.items():
                out[f"{PREFIX}{h}/{fname}"] = data
    return out


def restore(members: dict[str, bytes]) -> int:
    """Write stored kernels into Triton's cache (skipping those already there). Returns how many
    kernels were written."""
    if not members:
        return 0
    from triton.runtime.cache import get_cache_manager

    by_hash: dict[str, dict[str, bytes]] = {}
    for key, data in members.items():
        h, _, fname = key[len(PREFIX):].partition("/")
        if h and fname and "/" not in fname and not fname.startswith("."):
            by_hash.setdefault(h, {})[fname] = data
    written = 0
    for h, files in by_hash.items():
        meta_name = next((f for f in files if f.endswith(".json")), None)
        if meta_name is None:
            continue
        mgr = get_cache_manager(h)
        if mgr.get_group(meta_name) is not None:
            continue  # Triton has it already
        group = {fname: mgr.put(data, fname, binary=True) for fname, data in files.items()}
        mgr.put_group(meta_name, group)
        written += 1
    return written


def prewarm() -> Optional[threading.Thread]:
    """Import Triton and compute its installation hash on a daemon thread (both happen on the first
    kernel launch otherwise). Returns the thread, or None without Triton."""
    def work() -> None:
        try:
            import importlib

            import triton  # noqa: F401

            for mod in ("triton.runtime.cache", "triton.compiler.compiler"):  # where versions keep it
                key = getattr(importlib.import_module(mod), "triton_key", None)
                if key is not None:
                    key()  # cached by Triton for the process
                    break
            try:  # imported by the first JIT launch too (Triton >= 3.4)
                importlib.import_module("triton.experimental.gluon")
            except ImportError:
                pass
        except Exception as e:  # a warm-up is an optimization only
            log.debug("triton prewarm failed: %s", e)

    try:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return None
    except (ImportError, ValueError):
        return None
    t = threading.Thread(target=work, name="ember-triton-prewarm", daemon=True)
    t.start()
    return t
