"""Engines for the deployment tests: built here on the CPU, some with a manifest edited to look as if
they came from another machine (saved through Engine.save, so every digest and checksum is right)."""
from __future__ import annotations

import json
import zipfile

import ember
from tests.core.helpers import add_mul_model, save

H200_BUILD = {"platform": "Linux-x86_64", "python": "3.11.7", "torch": "2.11.0+cu130",
              "gpu": {"name": "NVIDIA H200", "capability": "9.0", "cuda": "13.0"}}


def onnx_model(tmp_path) -> str:
    return save(add_mul_model(), tmp_path / "am.onnx")


def cpu_engine(tmp_path, name: str = "cpu.engine", **build) -> str:
    path = str(tmp_path / name)
    ember.build(onnx_model(tmp_path), device="cpu", **build).save(path)
    return path


KERNEL_HASH = "ab" * 32


def h200_engine(tmp_path, name: str = "h200.engine", kernels: bool = False, **manifest) -> str:
    """An engine whose manifest says it was built and tuned on an H200 with torch 2.11 / CUDA 13;
    ``kernels``: it carries one compiled Triton kernel (metadata and an ELF stand-in for the cubin)."""
    engine = ember.build(onnx_model(tmp_path), device="cpu", shapes={"x": (2, 4)})
    engine.manifest.update({"device": "cuda", "torch_version": "2.11.0+cu130", "build_host": H200_BUILD, **manifest})
    if kernels:
        engine.kernel_binaries = {
            f"kernels/{KERNEL_HASH}/add_kernel.json": json.dumps({"hash": KERNEL_HASH, "name": "add_kernel"}).encode(),
            f"kernels/{KERNEL_HASH}/add_kernel.cubin": b"\x7fELF" + bytes(60)}
    path = str(tmp_path / name)
    engine.save(path)
    return path


def flip_last_byte(path: str, out: str, member: str) -> str:
    """A copy of the engine with the last byte of one member changed (a damaged copy)."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == member:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            dst.writestr(info, data)
    return out


def rewrite_manifest(path: str, out: str, **fields) -> str:
    """A copy of the engine with manifest fields replaced as raw JSON (its digest no longer matches:
    for the fields a loader refuses before it looks at the digest, such as a newer format version)."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "manifest.json":
                m = json.loads(data)
                m.update(fields)
                data = json.dumps(m).encode()
            dst.writestr(info.filename, data)
    return out
