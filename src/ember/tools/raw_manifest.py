"""An engine's manifest as written, read without the loader's checks: ``ember doctor`` diagnoses
engines the loader refuses (a newer or older format, another GPU), and ``ember build --rebuild-from``
rebuilds them. The manifest is data only; nothing from it is run.
"""
from __future__ import annotations

import json
import zipfile
from typing import Any, Optional

MANIFEST, DIGEST = "manifest.json", "digest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a larger manifest is not one ember wrote


def read_raw_manifest(path: str) -> tuple[dict[str, Any], list[str], Optional[str]]:
    """The manifest as written, whatever its format version, and the archive's member names; or
    the reason it cannot be read. (Loading checks more: format.py; this only needs the JSON.)"""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            try:
                info = z.getinfo(MANIFEST)
            except KeyError:
                return {}, names, f"'{path}' has no {MANIFEST}: it is not an ember engine, or it is damaged"
            if info.file_size > MAX_MANIFEST_BYTES:
                return {}, names, f"'{path}': {MANIFEST} is {info.file_size} bytes, not a manifest ember wrote"
            data = z.read(MANIFEST)
    except zipfile.BadZipFile:
        return {}, [], f"'{path}' is not an ember engine (not a zip archive, or truncated)"
    except (OSError, EOFError, zipfile.LargeZipFile) as e:
        return {}, [], f"'{path}' cannot be read: {e}"
    except Exception as e:  # zlib and CRC errors surface under several types
        return {}, [], f"'{path}': {MANIFEST} is damaged ({type(e).__name__}: {e})"
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return {}, names, f"'{path}': {MANIFEST} is not valid JSON ({str(e)[:200]})"
    if not isinstance(manifest, dict):
        return {}, names, f"'{path}': {MANIFEST} is not a JSON object"
    return manifest, names, None
