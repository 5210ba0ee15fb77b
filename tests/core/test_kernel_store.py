"""Compiled kernels stored in the engine file: recorded at launch, checksummed, restored into Triton's cache."""
from __future__ import annotations

import zipfile

import pytest

import ember
from ember.errors import EngineFileError
from ember.kernels import kernel_store
from ember.runtime.format import read_manifest, read_members

from .helpers import add_mul_model, save


class FakeKernel:
    """What a Triton launch returns, as far as the store reads it: a hash and its cache files."""

    def __init__(self, tmp_path, h: str, name: str):
        self.hash = h
        d = tmp_path / h
        d.mkdir()
        (d / f"{name}.json").write_text('{"name": "%s"}' % name)
        (d / f"{name}.cubin").write_bytes(b"\x7fELF" + h.encode())
        (d / f"{name}.ptx").write_text("// not stored")
        self.metadata_group = {f"{name}.{e}": str(d / f"{name}.{e}") for e in ("json", "cubin", "ptx")}


def test_recording_keeps_launched_kernels_only(tmp_path):
    a, b = FakeKernel(tmp_path, "a" * 8, "k_a"), FakeKernel(tmp_path, "b" * 8, "k_b")
    kernel_store.note(a)  # not recording: forgotten
    with kernel_store.recording() as rec:
        kernel_store.note(b)
        kernel_store.note(None)
    assert list(rec) == ["b" * 8]
    m = kernel_store.members(rec)
    assert set(m) == {"kernels/bbbbbbbb/k_b.json", "kernels/bbbbbbbb/k_b.cubin"}  # no IR text
    assert m["kernels/bbbbbbbb/k_b.cubin"] == b"\x7fELFbbbbbbbb"


def test_engine_file_carries_kernels_and_checks_them(tmp_path):
    k = FakeKernel(tmp_path, "c" * 8, "k_c")
    eng = ember.build(save(add_mul_model(), tmp_path / "m.onnx"))
    eng.kernel_binaries = kernel_store.members({k.hash: k})
    path = tmp_path / "m.engine"
    eng.save(path)
    manifest = read_manifest(path)
    assert manifest["kernels"]["count"] == 1
    assert read_members(path, manifest, kernel_store.PREFIX) == eng.kernel_binaries
    # a changed kernel byte is caught by its checksum
    damaged = tmp_path / "damaged.engine"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, data.replace(b"ELF", b"ELG") if info.filename.endswith(".cubin") else data)
    with pytest.raises(EngineFileError, match="checksum of kernels/cccccccc/k_c.cubin"):
        read_members(damaged, read_manifest(damaged), kernel_store.PREFIX)


def test_restore_writes_triton_cache_entries_once(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    from triton.runtime.cache import get_cache_manager

    k = FakeKernel(tmp_path, "d" * 64, "k_d")
    stored = kernel_store.members({k.hash: k})
    assert kernel_store.restore(stored) == 1
    group = get_cache_manager(k.hash).get_group("k_d.json")
    assert group is not None and set(group) == {"k_d.json", "k_d.cubin"}
    with open(group["k_d.cubin"], "rb") as f:
        assert f.read() == b"\x7fELF" + b"d" * 64
    assert kernel_store.restore(stored) == 0  # already in the cache
