"""Crafted engine files: an engine is data, and a file made to look like one is refused with an
EngineFileError naming what is wrong, before anything it holds is inflated, parsed or written."""
from __future__ import annotations

import json
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

import ember
from ember.errors import EngineFileError

from .engine_crafting import craft, members, recompute, sha, write, write_raw, zeros_deflated
from .helpers import add_mul_model, save

HEX = "ab" * 32


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("crafted")
    p = d / "m.engine"
    ember.build(save(add_mul_model(), d / "m.onnx"), device="cpu").save(p)
    return p


def test_recomputed_member_checksums_do_not_cover_an_edited_manifest(engine_path, tmp_path):
    """The attack the old format let through: change a member, list its new hash in the manifest."""
    items = members(engine_path)
    graph = json.loads(items["graph.json"])
    graph["name"] = "swapped"
    p = craft(engine_path, tmp_path / "swapped.engine", replace={"graph.json": json.dumps(graph).encode()},
              digest=False)
    assert json.loads(members(p)["manifest.json"])["members"]["graph.json"]["sha256"] == sha(members(p)["graph.json"])
    with pytest.raises(EngineFileError, match="manifest.json does not match the engine's digest"):
        ember.Engine.load(p)


def test_member_listed_with_a_wrong_hash_or_size(engine_path, tmp_path):
    p = craft(engine_path, tmp_path / "hash.engine",
              edit=lambda m: m["members"]["weights.safetensors"].update(sha256="0" * 64))
    with pytest.raises(EngineFileError, match="checksum of weights.safetensors does not match"):
        ember.Engine.load(p)
    p = craft(engine_path, tmp_path / "size.engine", edit=lambda m: m["members"]["graph.json"].update(size=1))
    with pytest.raises(EngineFileError, match=r"field 'members.graph.json.size' is 1, but the archive's member"):
        ember.Engine.load(p)


@pytest.mark.parametrize("name", ["run.py", "../escape.json", "/abs.json", "graph.json.bak", "kernels/"])
def test_members_ember_does_not_write_are_refused(engine_path, tmp_path, name):
    p = craft(engine_path, tmp_path / "extra.engine", replace={name: b"print('hi')"})
    with pytest.raises(EngineFileError, match="is not (part of an ember engine|a stored kernel)") as e:
        ember.Engine.load(p)
    assert name[:20] in str(e.value)


@pytest.mark.parametrize("name", [
    f"kernels/{HEX}/run.py",  # not a cubin or metadata
    f"kernels/../{HEX[:8]}.json",  # `..` as the hash directory
    "kernels/..%2f/k.json",
    "kernels/not-hex-at-all/k.json",
    f"kernels/{HEX.upper()}/k.json",  # Triton's hashes are lower-case hex
    f"kernels/{HEX[:62]}/k.json",  # too short
    f"kernels/{HEX}/sub/k.cubin",  # nested
    f"kernels/{HEX}/.hidden.json",  # dotfile
    f"kernels/{HEX}/k.json/..",
    f"kernels/{HEX}/k.ptx",  # text IR: a load never needs it
    f"kernels/{HEX}/k name.cubin",
])
def test_kernel_member_names_are_refused(engine_path, tmp_path, name):
    """Refused at open, before the digest, on every device: the name alone decides."""
    p = craft(engine_path, tmp_path / "k.engine", replace={name: b"\x7fELF"},
              edit=lambda m: m.update(kernels={"triton": "3.6.0", "count": 1}))
    with pytest.raises(EngineFileError, match="is not a stored kernel") as e:
        ember.Engine.load(p)
    assert name in str(e.value)


def test_kernel_metadata_without_its_binary_is_refused(engine_path, tmp_path):
    p = craft(engine_path, tmp_path / "k.engine", replace={f"kernels/{HEX}/k.json": b"{}"},
              edit=lambda m: m.update(kernels={"triton": "3.6.0", "count": 1}))
    with pytest.raises(EngineFileError, match="one <name>.json and one <name>.cubin"):
        ember.Engine.load(p)


def test_kernel_count_must_match_the_members(engine_path, tmp_path):
    p = craft(engine_path, tmp_path / "k.engine",
              replace={f"kernels/{HEX}/k.json": b"{}", f"kernels/{HEX}/k.cubin": b"\x7fELF"},
              edit=lambda m: m.update(kernels={"triton": "3.6.0", "count": 3}))
    with pytest.raises(EngineFileError, match="field 'kernels.count' is 3, but the file holds 1"):
        ember.Engine.load(p)


def _vm_peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_zip_bomb_is_refused_without_inflating(engine_path, tmp_path):
    """1.6 MB on disk, 1.6 GB inflated, and a manifest (with a matching digest) that claims it all."""
    size = 1600 << 20
    bomb = zeros_deflated(size)
    items = members(engine_path)
    m = json.loads(items["manifest.json"])
    m["members"]["weights.safetensors"] = {"sha256": "0" * 64, "size": size}
    manifest = json.dumps(m).encode()
    digest = json.dumps({"format": "ember-engine-digest", "algorithm": "sha256",
                         "manifest_sha256": sha(manifest)}).encode()
    p = tmp_path / "bomb.engine"
    write_raw(p, [("digest.json", digest, 0, len(digest)), ("manifest.json", manifest, 0, len(manifest)),
                  ("graph.json", items["graph.json"], 0, len(items["graph.json"])),
                  ("weights.safetensors", bomb, zipfile.ZIP_DEFLATED, size)])
    assert p.stat().st_size < 2_000_000
    peak_before = _vm_peak_kib()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(EngineFileError, match="refused without inflating it"):
            ember.Engine.load(p)
        elapsed = time.perf_counter() - t0
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert traced_peak < 64 << 20  # Python allocations while loading: nowhere near the inflated size
    assert _vm_peak_kib() - peak_before < 256 << 10  # nor the process's peak resident memory


def test_member_claiming_more_bytes_than_the_file_holds(engine_path, tmp_path):
    items = members(engine_path)
    p = tmp_path / "liar.engine"
    write_raw(p, [(n, b, 0, len(b)) for n, b in items.items() if n != "weights.safetensors"]
              + [("weights.safetensors", items["weights.safetensors"], 0, 1 << 31, 1 << 31)])
    with pytest.raises(EngineFileError, match="claims 2147483648 bytes, more than the file holds"):
        ember.Engine.load(p)


@pytest.mark.parametrize("name, cap", [("manifest.json", 32 << 20), ("digest.json", 64 << 10),
                                       ("graph.json", 256 << 20), (f"kernels/{HEX}/k.cubin", 64 << 20)])
def test_member_caps_by_kind(engine_path, tmp_path, name, cap):
    """A member over its kind's cap is refused from the central directory alone."""
    raw = zeros_deflated(((cap >> 20) + 1) << 20) if cap >= 1 << 20 else zeros_deflated(1 << 20)
    items = {n: b for n, b in members(engine_path).items() if n != name}
    p = tmp_path / "big.engine"
    write_raw(p, [(n, b, 0, len(b)) for n, b in items.items()]
              + [(name, raw, zipfile.ZIP_DEFLATED, max(cap + 1, 1 << 20))])
    with pytest.raises(EngineFileError, match=f"member '{name}' would be .* at most {cap} are allowed"):
        ember.Engine.load(p)


def test_deeply_nested_manifest(engine_path, tmp_path):
    depth = 100_000
    for doc in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        p = tmp_path / "deep.engine"
        items = members(engine_path)
        items["manifest.json"] = doc.encode()
        write(p, items)
        with pytest.raises(EngineFileError, match="manifest.json nests too deeply"):
            ember.Engine.load(p)


def test_deeply_nested_graph(engine_path, tmp_path):
    depth = 100_000
    deep = ('{"name": "g", "nodes": ' + "[" * depth + "]" * depth + "}").encode()
    p = craft(engine_path, tmp_path / "deep.engine", replace={"graph.json": deep})
    with pytest.raises(EngineFileError, match="graph.json nests too deeply"):
        ember.Engine.load(p)


def test_malformed_but_parsable_graph(engine_path, tmp_path):
    for doc in (b"[]", b'{"nodes": 3}', b'{"name": "g", "nodes": [{"op": 1}]}', b"null"):
        p = craft(engine_path, tmp_path / "bad.engine", replace={"graph.json": doc})
        with pytest.raises(EngineFileError, match="graph.json"):
            ember.Engine.load(p)


def _set(path: str, value):
    """An edit setting the manifest field at a dotted path (list indices as numbers)."""
    def edit(m):
        keys = path.split("|")
        obj = m
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        last = keys[-1]
        if value is _DELETE:
            del obj[last]
        elif isinstance(obj, list):
            obj[int(last)] = value
        else:
            obj[last] = value
    return edit


_DELETE = object()


@pytest.mark.parametrize("path, value, field", [
    ("profiles", "batch", "profiles"),
    ("profiles", [{"x": [[1, 4], [2, 4]]}], "profiles[0].x"),
    ("profiles", [{"x": [[8, 4], [2, 4], [1, 4]]}], "profiles[0].x"),
    ("profiles", [{"y": [[1, 4], [2, 4], [4, 4]]}], "profiles[0].y"),
    ("profiles", [{"x": [[1, "4"], [2, 4], [4, 4]]}], "profiles[0].x[0][1]"),
    ("profiles", [{"x": [[1, 4], [2, 4], [-4, 4]]}], "profiles[0].x[2][0]"),
    ("inputs", _DELETE, "inputs"),
    ("inputs", {"x": 1}, "inputs"),
    ("inputs|0|shape", "batch,4", "inputs[0].shape"),
    ("inputs|0|shape", [["batch"], 4], "inputs[0].shape[0]"),
    ("inputs|0|name", 7, "inputs[0].name"),
    ("outputs|0", "y", "outputs[0]"),
    ("outputs|0|dtype", _DELETE, "outputs[0].dtype"),
    ("members", [], "members"),
    ("members|graph.json|size", "12", "members.graph.json.size"),
    ("members|graph.json|size", -1, "members.graph.json.size"),
    ("members|graph.json|sha256", 12, "members.graph.json.sha256"),
    ("members|graph.json|sha256", "../" * 21 + "x", "members.graph.json.sha256"),
    ("members|graph.json", {"sha256": "0" * 64}, "members.graph.json"),
    ("kernels", {"triton": 3, "count": 0}, "kernels.triton"),
    ("kernels", [], "kernels"),
    ("kernels", {"triton": "3.6.0", "count": "1"}, "kernels.count"),
    ("build_host", ["x86"], "build_host"),
    ("build_host|gpu", {"name": "H200", "capability": 9.0}, "build_host.gpu.capability"),
    ("build_host|gpu", {"name": None, "capability": "9.0"}, "build_host.gpu.name"),
    ("precision", ["fp16"], "precision"),
    ("precision", "fp16; rm -rf /", "precision"),
    ("memory", {"activations_peak_mib": "a lot"}, "memory.activations_peak_mib"),
    ("memory", {"weights_mib": float("inf")}, "memory.weights_mib"),
    ("memory", 12, "memory"),
    ("opt_level", 10**6, "opt_level"),
    ("opt_level", True, "opt_level"),
    ("allow_tf32", "yes", "allow_tf32"),
    ("device", "tpu", "device"),
    ("nodes_in", -1, "nodes_in"),
    ("tactics", {"cudnn.conv": "many"}, "tactics.cudnn.conv"),
    ("fp32_layers", "conv1", "fp32_layers"),
    ("static_shapes", {"x": [1, "4"]}, "static_shapes.x[1]"),
    ("source", "model.onnx", "source"),
    ("format_version", "2", "format_version"),
])
def test_malformed_manifest_fields(engine_path, tmp_path, path, value, field):
    """Every field ember reads is checked in one place; the error names it. The digest is recomputed,
    so only the schema can refuse these."""
    p = craft(engine_path, tmp_path / "bad.engine", edit=_set(path, value))
    with pytest.raises(EngineFileError) as e:
        ember.Engine.load(p)
    assert f"'{field}'" in str(e.value) or f"field '{field}'" in str(e.value), str(e.value)


def test_unknown_manifest_fields_pass(engine_path, tmp_path):
    """A field this ember does not know is data it never reads: accepted (newer writers add fields)."""
    p = craft(engine_path, tmp_path / "extra.engine", edit=lambda m: m.update(future_field={"a": [1, 2]}))
    assert ember.Engine.load(p).manifest["future_field"] == {"a": [1, 2]}


def test_malformed_digest(engine_path, tmp_path):
    for digest in (b"[]", b'{"format": "ember-engine-digest", "algorithm": "md5", "manifest_sha256": "0"}',
                   b'{"format": "ember-engine-digest", "algorithm": "sha256", "manifest_sha256": 1}'):
        items = recompute(members(engine_path))
        items["digest.json"] = digest
        p = tmp_path / "digest.engine"
        write(p, items)
        with pytest.raises(EngineFileError, match="digest.json"):
            ember.Engine.load(p)


def test_duplicate_member_is_refused(engine_path, tmp_path):
    items = members(engine_path)
    p = tmp_path / "dup.engine"
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(p, "w") as z:
            for n, b in items.items():
                z.writestr(n, b)
            z.writestr("graph.json", b"{}")
    with pytest.raises(EngineFileError, match="holds member 'graph.json' twice"):
        ember.Engine.load(p)


def test_a_deflated_repack_of_an_engine_still_loads(engine_path, tmp_path):
    """Engines are written stored; one re-zipped with deflate (an artifact store, `zip -r`) is the same
    engine and loads, within the inflation caps."""
    p = tmp_path / "deflated.engine"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for n, b in members(engine_path).items():
            z.writestr(n, b)
    with zipfile.ZipFile(p) as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    assert ember.Engine.load(p).run({"x": np.ones((2, 4), np.float32)})["y"].shape == (2, 4)


def test_binary_members_inflating_more_than_json_may_are_refused(engine_path, tmp_path):
    """20x is plausible for JSON but not for weights: a 20 MiB weights member from 1 MiB is refused."""
    items = members(engine_path)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    raw = c.compress(np.random.default_rng(0).bytes(1 << 20)) + c.compress(b"\0" * (19 << 20)) + c.flush()
    assert 19 < (20 << 20) / len(raw) < 21
    p = tmp_path / "ratio.engine"
    write_raw(p, [(n, b, 0, len(b)) for n, b in items.items() if n != "weights.safetensors"]
              + [("weights.safetensors", raw, zipfile.ZIP_DEFLATED, 20 << 20)])
    with pytest.raises(EngineFileError, match=r"would inflate .* \(at most 10x\)"):
        ember.Engine.load(p)
