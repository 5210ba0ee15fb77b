"""Compiled kernels stored in the engine file: recorded at launch, checked by name and content,
restored into ember's own folder, where Triton's cache lookups find them (and Triton's cache is
never written)."""
from __future__ import annotations

import json
import os
import zipfile

import pytest

import ember
from ember.errors import EngineFileError
from ember.kernels import kernel_store
from ember.runtime.format import EngineArchive

from .helpers import add_mul_model, save


def _hash(c: str) -> str:
    return c * 64


class FakeKernel:
    """What a Triton launch returns, as far as the store reads it: a hash and its cache files."""

    def __init__(self, tmp_path, h: str, name: str):
        self.hash = h
        d = tmp_path / h
        d.mkdir()
        (d / f"{name}.json").write_text(json.dumps({"hash": h, "name": name}))
        (d / f"{name}.cubin").write_bytes(b"\x7fELF" + h.encode())
        (d / f"{name}.ptx").write_text("// not stored")
        self.metadata_group = {f"{name}.{e}": str(d / f"{name}.{e}") for e in ("json", "cubin", "ptx")}


@pytest.fixture()
def triton_knobs():
    """Restore Triton's cache-manager knob after a test that lets restore() install ember's."""
    pytest.importorskip("triton")
    from triton import knobs

    had = "manager_class" in knobs.cache.__dict__
    before = knobs.cache.__dict__.get("manager_class")
    fallback = kernel_store._FALLBACK
    yield knobs
    if had:
        knobs.cache.__dict__["manager_class"] = before
    else:
        knobs.cache.__dict__.pop("manager_class", None)
    kernel_store._FALLBACK = fallback


def test_recording_keeps_launched_kernels_only(tmp_path):
    a, b = FakeKernel(tmp_path, _hash("a"), "k_a"), FakeKernel(tmp_path, _hash("b"), "k_b")
    kernel_store.note(a)  # not recording: forgotten
    with kernel_store.recording() as rec:
        kernel_store.note(b)
        kernel_store.note(None)
    assert list(rec) == [_hash("b")]
    m = kernel_store.members(rec)
    assert set(m) == {f"kernels/{_hash('b')}/k_b.json", f"kernels/{_hash('b')}/k_b.cubin"}  # no IR text
    assert m[f"kernels/{_hash('b')}/k_b.cubin"] == b"\x7fELF" + _hash("b").encode()


def test_kernels_of_a_form_a_load_would_refuse_are_not_stored(tmp_path):
    short = FakeKernel(tmp_path, "c" * 8, "k_c")  # not a Triton hash
    assert kernel_store.members({short.hash: short}) == {}


def test_engine_file_carries_kernels_and_checks_them(tmp_path):
    k = FakeKernel(tmp_path, _hash("c"), "k_c")
    eng = ember.build(save(add_mul_model(), tmp_path / "m.onnx"))
    eng.kernel_binaries = kernel_store.members({k.hash: k})
    path = tmp_path / "m.engine"
    eng.save(path)
    with EngineArchive.open(path) as arc:
        assert arc.manifest["kernels"]["count"] == 1
        assert arc.read_prefix(kernel_store.PREFIX) == eng.kernel_binaries
    # a changed kernel byte is caught by its checksum
    damaged = tmp_path / "damaged.engine"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, data.replace(b"ELF", b"ELG") if info.filename.endswith(".cubin") else data)
    with EngineArchive.open(damaged) as arc, pytest.raises(EngineFileError, match=f"checksum of kernels/{_hash('c')}"):
        arc.read_prefix(kernel_store.PREFIX)


@pytest.mark.parametrize("name", [
    "kernels/../x.json", f"kernels/{_hash('a')}/run.py", "kernels/zz/k.json", f"kernels/{_hash('a')}/a/k.json",
    f"kernels/{_hash('a')}/.k.json", f"kernels/{_hash('a')}/k.hsaco", "weights.safetensors", "kernels//k.json",
])
def test_member_names_outside_the_form_are_errors_naming_them(name):
    with pytest.raises(EngineFileError, match="is not a stored kernel") as e:
        kernel_store.parse_member(name)
    assert name in str(e.value)
    with pytest.raises(EngineFileError):
        kernel_store.restore({name: b"\x7fELF"})


def test_member_names_of_the_form_parse():
    h = _hash("0")
    assert kernel_store.parse_member(f"kernels/{h}/_fused_add_mul_3.cubin") == (h, "_fused_add_mul_3", ".cubin")
    groups = kernel_store.kernel_groups([f"kernels/{h}/k.json", f"kernels/{h}/k.cubin"])
    assert groups == {h: (f"kernels/{h}/k.json", f"kernels/{h}/k.cubin")}
    with pytest.raises(EngineFileError, match="one <name>.json and one <name>.cubin"):
        kernel_store.kernel_groups([f"kernels/{h}/k.json", f"kernels/{h}/other.cubin"])


def test_restore_checks_contents(tmp_path, monkeypatch, triton_knobs):
    monkeypatch.setenv(kernel_store.STORE_ENV, str(tmp_path / "store"))
    h = _hash("e")
    good_meta = json.dumps({"hash": h}).encode()
    with pytest.raises(EngineFileError, match="is not the metadata of kernel"):
        kernel_store.restore({f"kernels/{h}/k.json": json.dumps({"hash": _hash("f")}).encode(),
                              f"kernels/{h}/k.cubin": b"\x7fELF"})
    with pytest.raises(EngineFileError, match="is not a cubin"):
        kernel_store.restore({f"kernels/{h}/k.json": good_meta, f"kernels/{h}/k.cubin": b"#!/bin/sh"})
    assert not (tmp_path / "store").exists()  # nothing written for a refused group


def test_restore_writes_to_embers_folder_and_triton_finds_it_there(tmp_path, monkeypatch, triton_knobs):
    """Written under $EMBER_TRITON_CACHE_DIR/<hash>/, never into Triton's cache; Triton's own lookup
    (get_cache_manager(hash).get_group) returns the stored files, other hashes go to Triton's cache."""
    store, triton_cache = tmp_path / "store", tmp_path / "triton"
    monkeypatch.setenv(kernel_store.STORE_ENV, str(store))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton_cache))
    from triton.runtime.cache import FileCacheManager, get_cache_manager

    k = FakeKernel(tmp_path, _hash("d"), "k_d")
    stored = kernel_store.members({k.hash: k})
    assert kernel_store.restore(stored) == 1
    assert sorted(p.name for p in (store / k.hash).iterdir()) == ["k_d.cubin", "k_d.json"]
    assert (store / k.hash / "k_d.cubin").read_bytes() == b"\x7fELF" + k.hash.encode()
    group = get_cache_manager(k.hash).get_group("k_d.json")
    assert group == {"k_d.json": str(store / k.hash / "k_d.json"), "k_d.cubin": str(store / k.hash / "k_d.cubin")}
    assert kernel_store.restore(stored) == 0  # already there, same bytes
    (store / k.hash / "k_d.cubin").write_bytes(b"\x7fELF stale")
    assert kernel_store.restore(stored) == 1  # different bytes: written again
    # a hash ember does not hold is Triton's: looked up and written in Triton's cache as before
    other = get_cache_manager(_hash("9"))
    assert other.get_group("k.json") is None
    path = other.put(b"data", "k.cubin")
    assert path.startswith(str(triton_cache)) and isinstance(other._other(), FileCacheManager)
    assert not any(p.suffix in (".cubin", ".json") and _hash("d") in str(p) for p in triton_cache.rglob("*"))


def test_restore_keeps_a_configured_manager_as_the_fallback(tmp_path, monkeypatch, triton_knobs):
    from triton.runtime.cache import FileCacheManager, get_cache_manager

    class Custom(FileCacheManager):
        pass

    monkeypatch.setenv(kernel_store.STORE_ENV, str(tmp_path / "store"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    triton_knobs.cache.manager_class = Custom
    k = FakeKernel(tmp_path, _hash("7"), "k")
    kernel_store.restore(kernel_store.members({k.hash: k}))
    assert type(get_cache_manager(_hash("8"))._other()) is Custom


def test_unwritable_store_is_an_os_error(tmp_path, monkeypatch, triton_knobs):
    """Engine.load turns this into a warning (the kernels compile on first use)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(kernel_store.STORE_ENV, str(blocker / "store"))
    k = FakeKernel(tmp_path, _hash("5"), "k")
    with pytest.raises(OSError):
        kernel_store.restore(kernel_store.members({k.hash: k}))


def test_store_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv(kernel_store.STORE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel_store.store_dir() == os.path.join(str(tmp_path), "ember", "triton")


@pytest.mark.cuda
def test_loaded_engine_compiles_nothing_in_a_fresh_process(tmp_path):
    """A fresh process with an empty Triton cache and an empty ember folder loads a CUDA engine and
    runs it: its kernels are written to ember's folder and nothing is compiled (no IR in either)."""
    import subprocess
    import sys

    import numpy as np
    import onnxruntime as ort

    import onnx
    from onnx import TensorProto, helper

    # a pointwise chain: one fusion group, so one generated Triton kernel to store
    nodes = [helper.make_node("Mul", ["x", "two"], ["a"]), helper.make_node("Add", ["a", "one"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["c"]), helper.make_node("Mul", ["c", "x"], ["y"])]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 64])],
                          [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                           helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = str(tmp_path / "chain.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    image = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    samples = str(tmp_path / "x.npz")
    np.savez(samples, image=image)
    eng = ember.build(model, device="cuda", precision="fp16")
    assert eng.kernel_binaries, "the pointwise chain's fusion group should have a compiled kernel to store"
    path = tmp_path / "chain.engine"
    eng.save(path)
    (ref,) = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": image})[:1]
    triton_cache, store = tmp_path / "triton-cache", tmp_path / "ember-kernels"
    code = ("import sys, numpy as np, ember\n"
            f"e = ember.Engine.load({str(path)!r})\n"
            "from triton import knobs\n"
            "assert knobs.cache.manager_class.__name__ == 'StoredKernels', knobs.cache.manager_class\n"
            f"x = np.load({samples!r})['image']\n"
            "np.save(sys.argv[1], e.run({'x': x})[e.outputs[0].name])\n")
    out = tmp_path / "out.npy"
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_CACHE_DIR": str(triton_cache), kernel_store.STORE_ENV: str(store)})
    assert r.returncode == 0, r.stderr[-3000:]
    in_store = [p.name for p in store.rglob("*") if p.is_file()]
    assert sum(n.endswith(".cubin") for n in in_store) == len(kernel_store.kernel_groups(eng.kernel_binaries))
    compiled = [p.name for p in triton_cache.rglob("*") if p.is_file() and p.suffix in (".cubin", ".ptx", ".ttir",
                                                                                      ".ttgir", ".llir")]
    assert compiled == [], compiled  # Triton compiled no kernel (its launcher stubs may be built: .so)
    got = np.load(out).astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2  # fp16 engine vs ONNX Runtime fp32
