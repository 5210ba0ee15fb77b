"""Crafting engine files as an attacker would: edit members, then recompute what can be recomputed."""
from __future__ import annotations

import hashlib
import json
import struct
import zipfile
import zlib
from typing import Any, Callable, Optional

MANIFEST, DIGEST = "manifest.json", "digest.json"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write(path, items: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in items.items():
            z.writestr(name, data)


def recompute(items: dict[str, bytes], edit: Optional[Callable[[dict], Any]] = None, *,
              checksums: bool = True, digest: bool = True) -> dict[str, bytes]:
    """Apply ``edit`` to the manifest, list every member's hash and size again (``checksums``),
    and rewrite the digest over the new manifest (``digest``; a signature is kept as it was)."""
    items = dict(items)
    m = json.loads(items[MANIFEST])
    if checksums:
        m["members"] = {n: {"sha256": sha(b), "size": len(b)} for n, b in items.items() if n not in (MANIFEST, DIGEST)}
    if edit is not None:
        edit(m)
    items[MANIFEST] = json.dumps(m, indent=2).encode()
    if digest:
        d = json.loads(items[DIGEST])
        d["manifest_sha256"] = sha(items[MANIFEST])
        items[DIGEST] = json.dumps(d).encode()
    return items


def craft(src, dst, *, replace: "dict[str, bytes] | None" = None, drop: tuple[str, ...] = (),
          edit: Optional[Callable[[dict], Any]] = None, checksums: bool = True, digest: bool = True):
    """``src`` with members replaced, added or dropped, then recomputed; written to ``dst``."""
    items = {n: b for n, b in members(src).items() if n not in drop}
    items.update(replace or {})
    write(dst, recompute(items, edit, checksums=checksums, digest=digest))
    return dst


def zeros_deflated(size: int) -> bytes:
    """A raw deflate stream inflating to ``size`` zero bytes, made without holding them: one
    self-contained block run for 1 MiB of zeros (a full flush resets the window), repeated."""
    chunk_len = 1 << 20
    assert size % chunk_len == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    c.compress(b"\0" * chunk_len)
    first = c.flush(zlib.Z_FULL_FLUSH)
    c.compress(b"\0" * chunk_len)
    chunk = c.flush(zlib.Z_FULL_FLUSH)  # the second run: no history from before the first flush
    return first + chunk * (size // chunk_len - 1) + c.flush(zlib.Z_FINISH)


def write_raw(path, entries: list[tuple]) -> None:
    """A zip whose central directory says what we want: (name, raw member bytes, method, claimed
    inflated size[, claimed compressed size]). CRCs are left 0: these files must be refused before
    any member is read."""
    out = bytearray()
    central = bytearray()
    for name, raw, method, size, *packed in entries:
        n = name.encode()
        offset = len(out)
        csize = packed[0] if packed else len(raw)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, 0, csize, size, len(n), 0) + n + raw
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, 0, csize, size,
                               len(n), 0, 0, 0, 0, 0, offset) + n
    cd_offset = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), cd_offset, 0)
    with open(path, "wb") as f:
        f.write(out)
