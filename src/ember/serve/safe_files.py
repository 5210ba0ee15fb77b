"""Opening the files a model configuration names, without leaving the model's folder.

A configuration (on disk, or sent with a repository load request) names files: the engine
(`default_model_filename`) and warm-up data (`input_data_file`). Those names are checked to be
relative and free of `..` when the configuration is read (config.relative_path); here, where
they are opened, symlinks are resolved and the result must still lie inside the folder, and
only regular files are read, with a bounded read. Without this, a load request could serve an
engine from anywhere on the host, read /etc/passwd as warm-up data, or grow the server by
gigabytes reading /dev/zero (issue 11).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import RepositoryError


def resolve_inside(base: Path, relative: str | Path, what: str) -> Path:
    """base/relative with symlinks resolved; a RepositoryError unless it stays inside base."""
    root = base.resolve()
    path = (base / relative).resolve()
    if path != root and root not in path.parents:
        raise RepositoryError(f"{what} {base / relative} leads to {path}, outside {root}; files a model uses must "
                              "lie inside its folder")
    return path


def read_regular_file(path: Path, limit: int, what: str, exact: int | None = None) -> bytes:
    """Read a regular file of at most `limit` bytes (exactly `exact` bytes if given). Devices, FIFOs
    and sockets are refused before any read, and nothing beyond the limit is ever read."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; we refuse it right after
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise RepositoryError(f"{what} {path}: cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RepositoryError(f"{what} {path} is not a regular file; give a file with the data")
        want = limit if exact is None else exact
        if exact is not None and exact > limit:
            raise RepositoryError(f"{what} {path}: {exact} bytes are needed, more than the limit of {limit}")
        if st.st_size > limit or (exact is not None and st.st_size != exact):
            need = f"exactly {exact}" if exact is not None else f"at most {limit}"
            raise RepositoryError(f"{what} {path} has {st.st_size} bytes; {need} are expected")
        chunks, got = [], 0
        while got < want:  # bounded even if the file grows while we read
            chunk = f.read(min(want - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
    if exact is not None and len(data) != exact:
        raise RepositoryError(f"{what} {path}: read {len(data)} bytes, expected {exact}")
    return data
