"""Compiled Triton kernels travel inside the engine file, so loading never compiles.

Recording. The builder runs the finished engine once at each profile's shapes while recording the
compiled kernels its launches return (:func:`recording`, :func:`note`); at save their binary and
metadata (``<name>.cubin`` and ``<name>.json``, what Triton reads on a cache hit) are stored as
``kernels/<hash>/<file>``, where ``<hash>`` is Triton's cache hash of the kernel: 64 hex digits.

Names. A kernel member is accepted only in exactly that form: a 64-hex-digit hash directory, and a
file named like a Python identifier ending in ``.json`` or ``.cubin``, one of each per hash with the
same stem (:func:`kernel_groups`). Anything else (``run.py``, ``..``, nested or hidden paths, other
extensions) makes the whole engine file an error naming the member. The metadata must be a JSON
object naming its own hash, and the binary an ELF file (:func:`restore`).

Where they go. On a load with the same GPU and Triton version as the build, :func:`restore` writes
them into ember's own folder (:func:`store_dir`: ``$EMBER_TRITON_CACHE_DIR``, else
``$XDG_CACHE_HOME/ember/triton``, else ``~/.cache/ember/triton``), never into Triton's cache.

How Triton finds them. Triton looks a kernel up with ``get_cache_manager(hash).get_group(...)``,
instantiating ``triton.knobs.cache.manager_class`` (Triton >= 3.4). :func:`restore` sets that knob,
once per process, to :class:`StoredKernels`: a manager that answers ``get_group``/``get_file`` from
ember's folder when it holds the hash asked for, and hands every other call (other hashes, every
write, Triton's dump and override managers) to the manager that was configured before it (Triton's
``FileCacheManager`` by default, or the user's ``TRITON_CACHE_MANAGER``). Other ways were weighed:
pointing ``TRITON_CACHE_DIR`` at ember's folder moves the cache of every Triton user in the process;
writing into Triton's cache is what this replaced; inserting compiled kernels into each
``JITFunction``'s in-memory cache needs Triton's specialization keys, private and changed between
releases. The manager class is a documented knob, and its hit path is Triton's normal cache hit.
Older Triton (no knobs) compiles stored kernels on first use: slower, never wrong. A different
Triton build has different hashes, so its lookups miss and it compiles, as it would without us.

Triton computes one hash over its own installation on the first launch in a process (about
0.3 s on the H200 machine); :func:`prewarm` does that on a thread while the weights load.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import threading
from typing import Any, Iterable, Iterator, Optional

from ..errors import EngineFileError

log = logging.getLogger(__name__)
PREFIX = "kernels/"
STORE_ENV = "EMBER_TRITON_CACHE_DIR"
METADATA_EXT, BINARY_EXT = ".json", ".cubin"
MAX_METADATA_BYTES = 1 << 20  # Triton's metadata JSON: a few KiB
MAX_BINARY_BYTES = 64 << 20  # one kernel's cubin: KiBs to a few MiB
_HASH = re.compile(r"[0-9a-f]{64}\Z")
# Triton names a kernel's files after the JIT function (a Python identifier), cut at 150 characters
_FILE = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,149})(\.json|\.cubin)\Z")


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# -- recording at build time --------------------------------------------------------------------
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
    """``kernels/<hash>/<file>`` -> bytes (metadata JSON and cubin) of recorded compiled kernels.
    A kernel whose hash or file names are not of the accepted form is left out (it compiles at load)."""
    out: dict[str, bytes] = {}
    for h, k in kernels.items():
        group = getattr(k, "metadata_group", None)
        if not isinstance(group, dict) or not isinstance(h, str) or not _HASH.match(h):
            continue
        files: dict[str, bytes] = {}
        for fname, path in group.items():
            if _FILE.match(fname):
                try:
                    with open(path, "rb") as f:
                        files[fname] = f.read()
                except OSError:
                    files = {}
                    break
        names = [f"{PREFIX}{h}/{fname}" for fname in files]
        try:
            kernel_groups(names)
        except EngineFileError as e:
            log.debug("kernel %s not stored: %s", h, e)
            continue
        out.update(zip(names, files.values()))
    return out


# -- what an engine file may hold -------------------------------------------------------------------
def parse_member(name: str) -> tuple[str, str, str]:
    """``kernels/<hash>/<stem><ext>`` -> (hash, stem, ext); anything else is an EngineFileError."""
    h, sep, fname = name[len(PREFIX):].partition("/") if name.startswith(PREFIX) else ("", "", "")
    m = _FILE.match(fname) if sep else None
    if not _HASH.match(h) or m is None:
        raise EngineFileError(
            f"member '{name[:200]}' is not a stored kernel: kernels are kernels/<64 hex digits>/<name>.json "
            "or .cubin. The file was not written by ember, or was altered; it is refused. Rebuild it.")
    return h, m.group(1), m.group(2)


def kernel_groups(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """The kernel members by hash: hash -> (metadata member, binary member). Every name must parse,
    and every hash must have exactly one metadata file and one binary of the same stem."""
    files: dict[str, dict[str, str]] = {}
    for name in names:
        h, stem, ext = parse_member(name)
        files.setdefault(h, {})[name] = stem + ext
    out: dict[str, tuple[str, str]] = {}
    for h, group in files.items():
        stems = {f.rsplit(".", 1)[0] for f in group.values()}
        exts = sorted(f.rsplit(".", 1)[1] for f in group.values())
        if len(stems) != 1 or exts != ["cubin", "json"]:
            raise EngineFileError(f"member(s) {', '.join(sorted(group))}: a stored kernel is one <name>.json "
                                  "and one <name>.cubin; the file was altered or damaged. Rebuild it.")
        meta = next(n for n in group if n.endswith(METADATA_EXT))
        binary = next(n for n in group if n.endswith(BINARY_EXT))
        out[h] = (meta, binary)
    return out


def member_cap(name: str) -> int:
    """The largest size a (well-formed) kernel member may have."""
    return MAX_METADATA_BYTES if name.endswith(METADATA_EXT) else MAX_BINARY_BYTES


# -- restoring at load time ----------------------------------------------------------------------
def store_dir() -> str:
    """ember's folder of restored kernels (one directory per hash)."""
    env = os.environ.get(STORE_ENV)
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ember", "triton")


def restore(stored: dict[str, bytes]) -> int:
    """Write stored kernels under :func:`store_dir` (those not already there with the same bytes) and
    make Triton look them up there. Returns how many kernels were written. Malformed members raise
    EngineFileError; an unwritable folder raises OSError (the caller warns: they compile on first use)."""
    if not stored:
        return 0
    groups = kernel_groups(stored)
    for h, (meta, binary) in groups.items():
        _check_contents(h, meta, stored[meta], binary, stored[binary])
    if not _install_cache_manager():
        log.info("stored kernels not restored: Triton %s has no usable cache-manager knob (Triton >= 3.4 has); "
                 "they compile on first use", triton_version())
        return 0
    root = store_dir()
    written = 0
    for h, (meta, binary) in groups.items():
        d = os.path.join(root, h)
        files = {meta.rsplit("/", 1)[1]: stored[meta], binary.rsplit("/", 1)[1]: stored[binary]}
        if all(_same_bytes(os.path.join(d, f), data) for f, data in files.items()):
            continue
        os.makedirs(d, mode=0o700, exist_ok=True)
        for f in sorted(files, key=lambda f: f.endswith(METADATA_EXT)):  # metadata last: it marks a whole kernel
            _write_atomic(os.path.join(d, f), files[f])
        written += 1
    return written


def _check_contents(h: str, meta: str, meta_bytes: bytes, binary: str, binary_bytes: bytes) -> None:
    try:
        md = json.loads(meta_bytes)
    except (ValueError, RecursionError):
        md = None
    if not isinstance(md, dict) or md.get("hash") != h:
        raise EngineFileError(f"member '{meta}' is not the metadata of kernel {h} (a JSON object naming "
                              "that hash); the file was altered or damaged. Rebuild it.")
    if not binary_bytes.startswith(b"\x7fELF"):
        raise EngineFileError(f"member '{binary}' is not a cubin (ELF); the file was altered or damaged. "
                              "Rebuild it.")


def _same_bytes(path: str, data: bytes) -> bool:
    try:
        if os.path.getsize(path) != len(data):
            return False
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # readers see the old file or the whole new one


# -- the cache manager Triton instantiates -------------------------------------------------------------
_INSTALL_LOCK = threading.Lock()
_MANAGER: Optional[type] = None
_FALLBACK: Optional[type] = None  # the manager class configured before ours


def _stored_dir(key: str) -> Optional[str]:
    """Triton passes its hash base32-encoded; our folders are named by the hex hash."""
    try:
        h = base64.b32decode(key + "=" * (-len(key) % 8)).hex()
    except (binascii.Error, ValueError):
        return None
    if not _HASH.match(h):
        return None
    d = os.path.join(store_dir(), h)
    return d if os.path.isdir(d) else None


def _manager_class() -> type:
    global _MANAGER
    if _MANAGER is not None:
        return _MANAGER
    from triton.runtime.cache import CacheManager

    class StoredKernels(CacheManager):
        """Answers lookups of kernels restored from engine files; everything else goes to the
        manager configured before it."""

        def __init__(self, key: str, override: bool = False, dump: bool = False):
            self.key = key
            self._mode = {"override": override, "dump": dump}
            self._dir = None if override or dump else _stored_dir(key)
            self._fallback: Any = None

        def _other(self) -> Any:
            if self._fallback is None:
                self._fallback = (_FALLBACK or _file_cache_manager())(self.key, **self._mode)
            return self._fallback

        def _stored(self, filename: str) -> Optional[str]:
            if self._dir is None or not _FILE.match(filename):
                return None
            p = os.path.join(self._dir, filename)
            return p if os.path.isfile(p) else None

        def get_group(self, filename: str) -> Optional[dict[str, str]]:
            if filename.endswith(METADATA_EXT):
                meta = self._stored(filename)
                binary = self._stored(filename[: -len(METADATA_EXT)] + BINARY_EXT)
                if meta and binary:
                    return {os.path.basename(meta): meta, os.path.basename(binary): binary}
            return self._other().get_group(filename)

        def get_file(self, filename: str) -> Optional[str]:
            return self._stored(filename) or self._other().get_file(filename)

        def put(self, data: Any, filename: str, binary: bool = True) -> str:
            return self._other().put(data, filename, binary=binary)

        def put_group(self, filename: str, group: dict[str, str]) -> Any:
            return self._other().put_group(filename, group)

        def __getattr__(self, name: str) -> Any:  # e.g. cache_dir: the fallback's
            if name.startswith("_"):
                raise AttributeError(name)
            return getattr(self._other(), name)

    StoredKernels.__module__ = __name__
    _MANAGER = StoredKernels
    return StoredKernels


def _file_cache_manager() -> type:
    from triton.runtime.cache import FileCacheManager

    return FileCacheManager


def _install_cache_manager() -> bool:
    """Make Triton's cache lookups consult ember's folder first. False when Triton has no knob for it."""
    global _FALLBACK
    try:
        from triton import knobs
    except ImportError:
        return False
    cache = getattr(knobs, "cache", None)
    if cache is None or not any("manager_class" in vars(c) for c in type(cache).__mro__):
        return False
    with _INSTALL_LOCK:
        ours = _manager_class()
        try:
            current = cache.manager_class  # may import the class named by $TRITON_CACHE_MANAGER
        except Exception as e:
            log.warning("Triton's cache manager setting is unusable (%s); stored kernels compile on first use", e)
            return False
        if current is not ours:
            _FALLBACK = current
            cache.manager_class = ours
    return True


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
