"""Engine files: round trip, and clear errors for damaged, tampered and incompatible files."""
from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest

import ember
from ember.errors import EngineFileError

from .helpers import add_mul_model, save


@pytest.fixture()
def engine_path(tmp_path):
    eng = ember.build(save(add_mul_model(), tmp_path / "m.onnx"), device="cpu")
    p = tmp_path / "m.engine"
    eng.save(p)
    return p


def _ref(x):
    return (x + np.array([0.5, -1.0, 2.0, 3.0], np.float32)) * x


def test_round_trip_and_manifest(engine_path):
    eng = ember.Engine.load(engine_path)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(eng.run({"x": x})["y"], _ref(x), rtol=1e-6)
    m = eng.manifest
    assert m["format"] == "ember-engine" and m["format_version"] == 2
    assert m["torch_version"] and m["ember_version"] == ember.__version__
    assert [i["name"] for i in m["inputs"]] == ["x"] and m["inputs"][0]["shape"] == ["batch", 4]
    with zipfile.ZipFile(engine_path) as z:
        assert set(z.namelist()) == {"digest.json", "manifest.json", "graph.json", "weights.safetensors"}
        items = {n: z.read(n) for n in z.namelist()}
    # the manifest lists every other member's hash and size; the digest is the manifest's hash
    assert m["members"] == {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                            for n, b in items.items() if n not in ("manifest.json", "digest.json")}
    digest = json.loads(items["digest.json"])
    assert digest["manifest_sha256"] == hashlib.sha256(items["manifest.json"]).hexdigest()
    assert "signature" not in digest


def test_truncated_file(engine_path, tmp_path):
    data = engine_path.read_bytes()
    p = tmp_path / "cut.engine"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineFileError, match="not an ember engine|damaged"):
        ember.Engine.load(p)


def _rewrite(src, dst, name, fn):
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for item in zi.namelist():
            data = zi.read(item)
            zo.writestr(item, fn(data) if item == name else data)


def test_tampered_weights(engine_path, tmp_path):
    p = tmp_path / "tampered.engine"

    def flip_last(b: bytes) -> bytes:
        return b[:-1] + bytes([b[-1] ^ 0xFF])

    _rewrite(engine_path, p, "weights.safetensors", flip_last)
    with pytest.raises(EngineFileError, match="checksum of weights.safetensors"):
        ember.Engine.load(p)


def test_newer_format_version(engine_path, tmp_path):
    p = tmp_path / "future.engine"

    def bump(b: bytes) -> bytes:
        m = json.loads(b)
        m["format_version"] = 99
        return json.dumps(m).encode()

    _rewrite(engine_path, p, "manifest.json", bump)
    with pytest.raises(EngineFileError, match="format version 99"):
        ember.Engine.load(p)


def test_format_version_1_is_refused_with_a_rebuild_message(engine_path, tmp_path):
    """Version 1 had no digest over its manifest: it is not read, and the message says to rebuild."""
    p = tmp_path / "v1.engine"

    def v1(b: bytes) -> bytes:
        m = json.loads(b)
        m["format_version"] = 1
        m["checksums"] = {k: v["sha256"] for k, v in m.pop("members").items()}
        return json.dumps(m).encode()

    _rewrite(engine_path, p, "manifest.json", v1)
    with pytest.raises(EngineFileError, match=r"format version 1 .*no digest.*Rebuild it with `ember build`"):
        ember.Engine.load(p)


def test_manifest_edited_without_the_digest(engine_path, tmp_path):
    """Any byte of the manifest changed (here: a profile widened) and the digest no longer matches."""
    p = tmp_path / "edited.engine"
    _rewrite(engine_path, p, "manifest.json", lambda b: b.replace(b'"opt_level": 2', b'"opt_level": 3'))
    with pytest.raises(EngineFileError, match="manifest.json does not match the engine's digest"):
        ember.Engine.load(p)


def test_not_an_engine(tmp_path):
    p = tmp_path / "x.engine"
    p.write_bytes(b"hello, this is not a zip file at all")
    with pytest.raises(EngineFileError, match="not an ember engine"):
        ember.Engine.load(p)
    with pytest.raises(EngineFileError, match="does not exist"):
        ember.Engine.load(tmp_path / "missing.engine")


def test_missing_member(engine_path, tmp_path):
    p = tmp_path / "partial.engine"
    with zipfile.ZipFile(engine_path) as zi, zipfile.ZipFile(p, "w") as zo:
        for item in zi.namelist():
            if item != "graph.json":
                zo.writestr(item, zi.read(item))
    with pytest.raises(EngineFileError, match="has no graph.json"):
        ember.Engine.load(p)


def test_engine_from_another_gpu_is_refused():
    from ember.runtime.engine import check_same_gpu

    manifest = {"device": "cuda", "build_host": {"gpu": {"name": "NVIDIA H200", "capability": "9.0"}}}
    check_same_gpu(manifest, "NVIDIA H200", "9.0", "m.engine")  # same GPU: fine
    with pytest.raises(EngineFileError, match="built and tuned on NVIDIA H200 .*this GPU is NVIDIA A100"):
        check_same_gpu(manifest, "NVIDIA A100-SXM4-80GB", "8.0", "m.engine")
    check_same_gpu({"device": "cpu"}, "NVIDIA A100", "8.0", "m.engine")  # CPU engines run anywhere


def test_memory_plan_and_workspace(tmp_path):
    from ember.errors import EmberError

    eng = ember.build(save(add_mul_model(), tmp_path / "m.onnx"), device="cpu")
    mem = eng.manifest["memory"]
    assert 0 < mem["activations_peak_mib"] <= mem["activations_naive_mib"]
    with pytest.raises(EmberError, match="--workspace allows"):
        ember.build(save(add_mul_model(), tmp_path / "m2.onnx"), device="cpu", workspace=1e-9)


def test_reduced_precision_engine_stores_each_weight_once():
    """fp16 engines keep the converted weights only, not the fp32 originals beside them."""
    fp32 = ember.build("examples/digits/digits_cnn.onnx")
    fp16 = ember.build("examples/digits/digits_cnn.onnx", precision="fp16")
    used = {v.name for n in fp16.graph.nodes for v in n.inputs if v is not None}
    assert set(fp16.graph.initializers) <= used
    assert not any(v.data.dtype == np.float32 and v.data.size > 16 for v in fp16.graph.initializers.values())
    n32 = sum(v.data.nbytes for v in fp32.graph.initializers.values())
    n16 = sum(v.data.nbytes for v in fp16.graph.initializers.values())
    assert n16 < 0.55 * n32
