"""The engine file (format version 2): a zip archive of data, never code.

Members::

    digest.json          {"format": "ember-engine-digest", "algorithm": "sha256",
                          "manifest_sha256": <hex>, "signature": {"algorithm": "hmac-sha256", "value": <hex>}?}
    manifest.json        versions, device, profiles, IO, precision, ... and "members":
                         {<name>: {"sha256": <hex>, "size": <bytes>}} for every member below
    graph.json           the optimized IR (kernel source is regenerated from it, never stored)
    weights.safetensors  constants
    kernels/<hash>/<name>.json|.cubin   compiled Triton kernels of CUDA engines (kernels/kernel_store.py)

The digest is the SHA-256 of the exact bytes of manifest.json. The manifest lists the SHA-256 and size
of every other member, so the digest covers every byte a load reads; an engine signed with
``--sign-key`` carries an HMAC of it (signing.py).

A load checks, in this order, and nothing is inflated or parsed before the checks that guard it:

1. the zip's central directory: each member name is one of the above (kernels in kernel_store's
   form), none twice, stored or deflated, within a cap for its kind (manifest 32 MiB, digest 64 KiB,
   graph 256 MiB, kernel metadata 1 MiB, kernel binary 64 MiB; weights: only the next rule), its
   compressed bytes inside the archive, and inflating at most 100x (JSON) or 10x (binaries);
2. manifest.json (a bounded read) is JSON naming this format and version; version 1 files (no
   digest) are refused with a message to rebuild them;
3. digest.json matches the manifest's SHA-256, then the signature policy (signing.py);
4. the manifest's schema (manifest.py); its member list is exactly the archive's other members,
   each with the size the central directory gives;
5. each member, when read, is read up to its listed size only and must match its listed SHA-256.

Loading parses JSON and safetensors and never unpickles or runs Python from the file. The kernel
binaries are the one executable content: checked like every member, and handed to Triton (through
ember's own cache folder) only when the GPU and Triton version match the build.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import zipfile
from dataclasses import dataclass
from typing import Any, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import EngineFileError
from ..ir.graph import Graph
from ..ir.serialize import FormatError, graph_from_json, graph_to_json
from ..kernels import kernel_store
from ..ops.torch_types import tensor_from_numpy, tensor_to_numpy
from . import signing
from .manifest import check_manifest, field_error

FORMAT_NAME = "ember-engine"
FORMAT_VERSION = 2
DIGEST_FORMAT = "ember-engine-digest"
MANIFEST, DIGEST, GRAPH, WEIGHTS = "manifest.json", "digest.json", "graph.json", "weights.safetensors"
MAX_MEMBERS = 1 << 16
# deflate reaches ~1000x on zeros; JSON deflates 5-20x, weights and cubins less than 4x
MAX_INFLATION_JSON, MAX_INFLATION_BINARY = 100, 10
_FIXED_CAPS = {MANIFEST: 32 << 20, DIGEST: 64 << 10, GRAPH: 256 << 20, WEIGHTS: None}


@dataclass
class EngineFile:
    manifest: dict[str, Any]
    graph: Graph
    weights: dict[str, torch.Tensor]  # "const/<name>" and "attr/..." tensors, on CPU
    signed: bool = False


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# -- writing -----------------------------------------------------------------------------------------------
def write_engine(path: "str | os.PathLike", graph: Graph, manifest: dict[str, Any],
                 extra: "dict[str, bytes] | None" = None, sign_key: "bytes | None" = None) -> int:
    """Write the engine; returns its size in bytes. Writes to a temp file first, then renames.
    ``extra``: further members (compiled kernels under ``kernels/``). ``sign_key``: HMAC the digest."""
    path = os.fspath(path)
    extra = dict(extra or {})
    kernel_store.kernel_groups(extra)  # never write a file that a load would refuse
    obj, arrays = graph_to_json(graph)
    graph_bytes = json.dumps(obj, separators=(",", ":")).encode()
    tensors = {k: tensor_from_numpy(v).contiguous() for k, v in arrays.items()}
    weights_bytes = st_save(tensors) if tensors else st_save({})
    members = {GRAPH: graph_bytes, WEIGHTS: weights_bytes, **extra}
    manifest = {k: v for k, v in manifest.items() if k not in ("checksums", "members")}
    manifest.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                     "members": {k: {"sha256": _sha256(v), "size": len(v)} for k, v in members.items()}})
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    check_manifest(json.loads(manifest_bytes), path)
    digest = {"format": DIGEST_FORMAT, "algorithm": "sha256", "manifest_sha256": _sha256(manifest_bytes)}
    if sign_key is not None:
        digest["signature"] = {"algorithm": signing.ALGORITHM,
                               "value": signing.sign(sign_key, digest["manifest_sha256"])}
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # concurrent saves must not share it
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr(DIGEST, json.dumps(digest, indent=2))
            z.writestr(MANIFEST, manifest_bytes)
            for name, data in members.items():
                z.writestr(name, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


# -- reading -----------------------------------------------------------------------------------------------
class EngineArchive:
    """An engine file opened and checked (steps 1-4 above); members are read on demand (step 5).
    Use as a context manager: the archive stays open, so every member comes from the one file."""

    def __init__(self, path: str, zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo],
                 manifest: dict[str, Any], signed: bool):
        self.path, self._zip, self._infos = path, zf, infos
        self.manifest, self.signed = manifest, signed

    @classmethod
    def open(cls, path: "str | os.PathLike", verify_key: "bytes | None" = None, *,
             require_key_if_signed: bool = False) -> "EngineArchive":
        """``verify_key``: refuse the engine unless it is signed with this key. ``require_key_if_signed``:
        refuse a signed engine when no key is given (its builder asked for verification)."""
        path = os.fspath(path)
        zf = _open_zip(path)
        try:
            infos = _check_directory(zf, path)
            manifest_bytes = _read_bounded(zf, infos[MANIFEST], infos[MANIFEST].file_size, path)
            manifest = _parse_json(manifest_bytes, MANIFEST, path)
            _check_format(manifest, path)
            if DIGEST not in infos:
                raise EngineFileError(f"engine '{path}' has no {DIGEST}: it is damaged or not an ember engine; "
                                      "rebuild it with `ember build`")
            digest = _parse_digest(_read_bounded(zf, infos[DIGEST], infos[DIGEST].file_size, path), path)
            if digest["manifest_sha256"] != _sha256(manifest_bytes):
                raise EngineFileError(
                    f"engine '{path}': {MANIFEST} does not match the engine's digest ({DIGEST}): the manifest was "
                    "modified or damaged after the engine was built. Rebuild it with `ember build`.")
            signed = _check_signature(digest, verify_key, require_key_if_signed, path)
            check_manifest(manifest, path)
            _check_members(manifest, infos, path)
        except BaseException:
            zf.close()
            raise
        return cls(path, zf, infos, manifest, signed)

    def __enter__(self) -> "EngineArchive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def names(self, prefix: str) -> list[str]:
        return [n for n in self.manifest["members"] if n.startswith(prefix)]

    def read(self, name: str) -> bytes:
        """One member, read up to its listed size and checked against its listed SHA-256."""
        entry = self.manifest["members"].get(name)
        if entry is None:
            raise EngineFileError(f"engine '{self.path}' has no {name}: it is damaged or not an ember engine; "
                                  "rebuild it")
        data = _read_bounded(self._zip, self._infos[name], entry["size"], self.path)
        if _sha256(data) != entry["sha256"]:
            raise EngineFileError(f"engine '{self.path}': the checksum of {name} does not match the manifest — the "
                                  "file was modified or damaged after it was built. Rebuild it with `ember build`.")
        return data

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        return {n: self.read(n) for n in self.names(prefix)}

    def engine_file(self) -> EngineFile:
        """The graph and weights, parsed."""
        graph_bytes, weights_bytes = self.read(GRAPH), self.read(WEIGHTS)
        try:
            weights = st_load(weights_bytes)
            arrays = {k: tensor_to_numpy(t) for k, t in weights.items()}
        except Exception as e:  # safetensors reports malformed headers under several types
            raise EngineFileError(f"engine '{self.path}': {WEIGHTS} cannot be read ({type(e).__name__}: {e}); "
                                  "rebuild the engine") from None
        obj = _parse_json(graph_bytes, GRAPH, self.path)
        try:
            graph = graph_from_json(obj, arrays)
        except FormatError as e:
            raise EngineFileError(f"engine '{self.path}': {GRAPH} is invalid ({e}); rebuild the engine") from None
        except RecursionError:
            raise EngineFileError(f"engine '{self.path}': {GRAPH} nests too deeply to be an ember graph; "
                                  "rebuild the engine") from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
            # a parsable graph.json of the wrong shape: still the file's fault, never a raw error
            raise EngineFileError(f"engine '{self.path}': {GRAPH} is malformed ({type(e).__name__}: {e}); "
                                  "rebuild the engine") from None
        return EngineFile(self.manifest, graph, weights, self.signed)


def read_manifest(path: "str | os.PathLike", verify_key: "bytes | None" = None) -> dict[str, Any]:
    """The checked manifest (digest, schema, member sizes; the signature when ``verify_key``)."""
    with EngineArchive.open(path, verify_key) as arc:
        return arc.manifest


def read_engine(path: "str | os.PathLike", verify_key: "bytes | None" = None, *,
                require_key_if_signed: bool = False) -> EngineFile:
    """Manifest, graph and weights, every member checked. Tools that only read (inspect) call this
    without a key; Engine.load, which runs the engine, refuses a signed engine without its key."""
    with EngineArchive.open(path, verify_key, require_key_if_signed=require_key_if_signed) as arc:
        return arc.engine_file()


# -- the checks --------------------------------------------------------------------------------------------
def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.exists(path):
        raise EngineFileError(f"engine file '{path}' does not exist")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
        raise EngineFileError(
            f"'{path}' is not an ember engine (not a zip archive, or truncated). "
            "Rebuild it with `ember build`; if you meant an ONNX model, pass the .onnx file.") from None
    except OSError as e:
        raise EngineFileError(f"cannot read engine file '{path}': {e.strerror or e}") from None


def _check_directory(zf: zipfile.ZipFile, path: str) -> dict[str, zipfile.ZipInfo]:
    """Step 1: names, kinds, compression and sizes from the central directory, nothing inflated."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise EngineFileError(f"engine '{path}' has {len(infos)} members (at most {MAX_MEMBERS}); it is not an "
                              "ember engine")
    archive_size = os.path.getsize(path)
    out: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if name in out:
            raise EngineFileError(f"engine '{path}' holds member '{name[:200]}' twice; the file was altered. "
                                  "Rebuild it.")
        if name in _FIXED_CAPS:
            cap = _FIXED_CAPS[name]
        elif name.startswith(kernel_store.PREFIX):
            try:
                kernel_store.parse_member(name)
            except EngineFileError as e:
                raise EngineFileError(f"engine '{path}': {e}") from None
            cap = kernel_store.member_cap(name)
        else:
            raise EngineFileError(f"engine '{path}': member '{name[:200]}' is not part of an ember engine (it holds "
                                  f"{', '.join(sorted(_FIXED_CAPS))} and kernels/); the file was altered. Rebuild it.")
        where = f"engine '{path}': member '{name}'"
        if info.flag_bits & 0x1:
            raise EngineFileError(f"{where} is encrypted; ember engines never are. Rebuild it.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise EngineFileError(f"{where} uses zip compression method {info.compress_type}; ember engines are "
                                  "stored (or deflated). Rebuild it.")
        if info.compress_size > archive_size or info.header_offset + info.compress_size > archive_size:
            raise EngineFileError(f"{where} claims {info.compress_size} bytes, more than the file holds: it is "
                                  "truncated or damaged. Rebuild it.")
        if cap is not None and info.file_size > cap:
            raise EngineFileError(f"{where} would be {info.file_size} bytes; at most {cap} are allowed for it. "
                                  "Refused without reading it; rebuild the engine.")
        stored = info.compress_type == zipfile.ZIP_STORED
        ratio = MAX_INFLATION_JSON if name.endswith(".json") else MAX_INFLATION_BINARY
        if (stored and info.file_size != info.compress_size) or info.file_size > ratio * max(info.compress_size, 1):
            raise EngineFileError(f"{where} would inflate {info.compress_size} bytes to {info.file_size} (at most "
                                  f"{ratio}x): refused without inflating it (a zip bomb, or damage). "
                                  "Rebuild the engine.")
        out[name] = info
    if MANIFEST not in out:
        raise EngineFileError(f"engine '{path}' has no {MANIFEST}: it is damaged or not an ember engine; rebuild it")
    return out


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, path: str) -> bytes:
    """At most ``size`` bytes of one member (the zip's own CRC is checked when the read reaches its end)."""
    name = info.filename
    try:
        with zf.open(info) as f:
            data = f.read(size + 1)
    except Exception as e:  # zlib errors, CRC mismatches and truncation surface under several types
        raise EngineFileError(f"engine '{path}': {name} cannot be read ({type(e).__name__}: {e}); the file is "
                              "damaged, rebuild it") from None
    if len(data) != size:
        raise EngineFileError(f"engine '{path}': {name} holds {len(data)} bytes, not the {size} listed; the file "
                              "is damaged, rebuild it")
    return data


def _parse_json(data: bytes, name: str, path: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise EngineFileError(f"engine '{path}': {name} nests too deeply to be an ember {name}; the file was "
                              "altered or damaged. Rebuild it.") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, integers too long to convert
        raise EngineFileError(f"engine '{path}': {name} is not valid JSON ({e}); rebuild the engine") from None


def _check_format(m: Any, path: str) -> None:
    """Step 2: the format name and version, before anything else of the manifest is believed."""
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise EngineFileError(f"'{path}' is not an ember engine (manifest format is {str(got)[:80]!r})")
    v = m.get("format_version")
    built_by = str(m.get("ember_version", "?"))[:40]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise field_error(path, "format_version", f"is {str(v)[:40]!r}, not a format version")
    if v > FORMAT_VERSION:
        raise EngineFileError(
            f"engine '{path}' uses engine format version {v}; this ember reads version {FORMAT_VERSION}. "
            f"It was built by ember {built_by}: upgrade ember, or rebuild the engine with this one.")
    if v < FORMAT_VERSION:
        raise EngineFileError(
            f"engine '{path}' uses engine format version {v} (built by ember {built_by}), which has no digest over "
            f"its manifest; this ember reads version {FORMAT_VERSION} only. Rebuild it with `ember build`.")


def _parse_digest(data: bytes, path: str) -> dict[str, Any]:
    d = _parse_json(data, DIGEST, path)
    bad = None
    if not isinstance(d, dict) or d.get("format") != DIGEST_FORMAT:
        bad = "is not an ember engine digest"
    elif d.get("algorithm") != "sha256":
        bad = f"uses digest algorithm {str(d.get('algorithm'))[:40]!r}; this ember knows sha256"
    elif not _is_hex64(d.get("manifest_sha256")):
        bad = "has no manifest_sha256 (64 hex digits)"
    else:
        sig = d.get("signature")
        if sig is not None and (not isinstance(sig, dict) or sig.get("algorithm") != signing.ALGORITHM
                                or not _is_hex64(sig.get("value"))):
            bad = f"has a malformed signature (expected {{\"algorithm\": \"{signing.ALGORITHM}\", \"value\": <hex>}})"
    if bad:
        raise EngineFileError(f"engine '{path}': {DIGEST} {bad}; the file was altered or damaged. Rebuild it.")
    return d


def _is_hex64(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _check_signature(digest: dict[str, Any], key: Optional[bytes], require_key_if_signed: bool, path: str) -> bool:
    """Step 3's policy: with a key, only engines signed with it; without one, no signed engine when
    ``require_key_if_signed``. Returns whether the engine is signed."""
    sig = digest.get("signature")
    if key is not None:
        if sig is None:
            raise signing.EngineSignatureError(
                f"engine '{path}' is not signed, and this load accepts only engines signed with its verify key. "
                "Build it with `ember build --sign-key KEYFILE` using that key.")
        if not signing.verify(key, digest["manifest_sha256"], sig["value"]):
            raise signing.EngineSignatureError(
                f"engine '{path}': its signature does not match the verify key: it was signed with another key, "
                "or altered after it was signed. Refused.")
    elif sig is not None and require_key_if_signed:
        raise signing.EngineSignatureError(
            f"engine '{path}' is signed: its builder asked that it be verified before it runs. Pass the key: "
            "Engine.load(path, verify_key=KEYFILE), or --verify-key KEYFILE (ember serve also reads "
            f"${signing.KEY_FILE_ENV}).")
    return sig is not None


def _check_members(manifest: dict[str, Any], infos: dict[str, zipfile.ZipInfo], path: str) -> None:
    """Step 4: the manifest's member list is the archive's, size for size."""
    listed = manifest["members"]
    for name in (MANIFEST, DIGEST):
        if name in listed:
            raise field_error(path, f"members.{name}", "is listed, but the manifest and digest are not members it "
                              "can list")
    for name in (GRAPH, WEIGHTS, *listed):
        if name not in infos:
            raise EngineFileError(f"engine '{path}' has no {name[:200]}: it is damaged or not an ember engine; "
                                  "rebuild it")
    for name, info in infos.items():
        if name in (MANIFEST, DIGEST):
            continue
        if name not in listed:
            raise EngineFileError(f"engine '{path}': member '{name}' is not listed in the manifest; the file was "
                                  "altered after it was built. Rebuild it.")
        if listed[name]["size"] != info.file_size:
            raise field_error(path, f"members.{name}.size",
                              f"is {listed[name]['size']}, but the archive's member holds {info.file_size} bytes")
    try:
        groups = kernel_store.kernel_groups(n for n in listed if n.startswith(kernel_store.PREFIX))
    except EngineFileError as e:
        raise EngineFileError(f"engine '{path}': {e}") from None
    count = (manifest.get("kernels") or {}).get("count", 0)
    if count != len(groups):
        raise field_error(path, "kernels.count", f"is {count}, but the file holds {len(groups)} kernel(s)")
