"""Engine signing: an HMAC-SHA256 over the engine's digest, so a deployment can refuse engines it did
not build.

The digest (format.py) is the SHA-256 of the exact bytes of ``manifest.json``, and the manifest lists
the SHA-256 and size of every other member: one MAC over the digest covers every byte a load reads.
The MAC is keyed with a shared secret (HMAC, not a public-key signature): the machine that builds
(``ember build --sign-key FILE``) and the machines that load (``Engine.load(path, verify_key=...)``,
``ember run/bench/serve --verify-key FILE``) hold the same key file, as they would a bearer token.

A key file holds the key's bytes; trailing newlines are ignored, so ``openssl rand -hex 32 > key``
makes a good one. Keys shorter than 16 bytes are refused (guessable). A key file that every user
may read is loaded with a warning, not refused: secrets mounted into containers are often 0644.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from typing import Union

from ..errors import EmberError, EngineFileError

log = logging.getLogger(__name__)

ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 64 << 10  # a bigger file is not a key file
KEY_FILE_ENV = "EMBER_VERIFY_KEY_FILE"  # the server's key file where options are awkward (containers)
# the MAC covers this prefix too, so a MAC made with the same key for some other purpose never
# passes for an engine signature
_CONTEXT = b"ember-engine-digest/v2\x00"

KeySource = Union[bytes, bytearray, str, "os.PathLike[str]"]


class SigningKeyError(EmberError):
    """A signing or verification key is missing, unreadable, empty or too short."""


class EngineSignatureError(EngineFileError):
    """An engine's signature is missing, wrong, or present where no key was given to check it."""


def load_key(source: KeySource) -> bytes:
    """The key's bytes: ``source`` itself when it is bytes, else the contents of the file it names."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        key, origin = bytes(source), "the key given"
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        key, origin = _read_key_file(path), f"key file '{path}'"
    else:
        raise SigningKeyError(f"a key is bytes or the path of a key file, not {type(source).__name__}")
    if not key:
        raise SigningKeyError(f"{origin} is empty; make a key with `openssl rand -hex 32 > engine.key`")
    if len(key) < MIN_KEY_BYTES:
        raise SigningKeyError(f"{origin} holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} "
                              "(make one with `openssl rand -hex 32 > engine.key`)")
    return key


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise SigningKeyError(f"key file '{path}' is not a regular file")
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise SigningKeyError(f"cannot read key file '{path}': {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SigningKeyError(f"'{path}' is over {MAX_KEY_FILE_BYTES >> 10} KiB: not a key file")
    if mode & stat.S_IROTH:
        log.warning("key file '%s' can be read by every user of this machine; `chmod 600 %s` keeps it secret",
                    path, path)
    return data.rstrip(b"\r\n")


def sign(key: bytes, digest: str) -> str:
    """The hex HMAC-SHA256 of an engine digest (hex SHA-256 of its manifest)."""
    return hmac.new(key, _CONTEXT + digest.encode("ascii"), hashlib.sha256).hexdigest()


def verify(key: bytes, digest: str, signature: str) -> bool:
    """Whether ``signature`` is this key's MAC over ``digest`` (constant-time comparison)."""
    return hmac.compare_digest(sign(key, digest).encode("ascii"), signature.encode("ascii", "replace"))

