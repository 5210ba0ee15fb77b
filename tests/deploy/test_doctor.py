"""`ember doctor`: the environment report on this CPU machine, engines that will and will not run
here (each with the exact reason), and the JSON document."""
from __future__ import annotations

import json
import os
import sys
import types

import pytest

from ember.cli.main import main
from ember.tools import environment

from .helpers import cpu_engine, flip_last_byte, h200_engine, rewrite_manifest

_REAL_PROBE = environment.probe_host


def doctor_json(capsys, *args: str) -> tuple[int, dict]:
    rc = main(["doctor", "--json", *args])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def a100_host(**over):
    """What probe_host reports on an A100 machine (for the checks that need a GPU this machine lacks)."""
    host = _REAL_PROBE(triton_check=False)
    host.update({"torch": "2.11.0+cu130", "triton": "3.6.0",
                 "cuda": {"runtime": "13.0", "driver": "580.159.04", "driver_cuda": "13.0"},
                 "gpus": [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0",
                           "memory_total_bytes": 80 * 2**30, "source": "test"}]})
    host.update(over)
    return host


def test_environment_on_this_cpu_machine(capsys):
    rc, doc = doctor_json(capsys)
    assert rc == 0 and doc["ok"] is True and doc["engines"] == [] and doc["ember_doctor"] == 1
    host = doc["host"]
    import onnx
    import torch
    assert host["torch"] == torch.__version__ and host["packages"]["onnx"] == onnx.__version__
    assert host["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    if torch.version.cuda is None:  # the CPU CI machine
        assert host["gpus"] == [] and "CPU-only build" in host["cuda"]["unavailable"]
        assert host["libraries"]["cudnn"]["version"] is None and host["libraries"]["cudnn"]["reason"]
        assert host["triton_compile"]["ran"] is False and "not run" in host["triton_compile"]["reason"]
    caches = host["caches"]
    assert set(caches) == {"timing_cache", "triton_cache", "ember_kernel_cache", "serve_cache"}
    assert caches["timing_cache"]["path"].endswith(os.path.join("ember", "timing_cache.json"))
    assert all({"path", "exists", "writable"} <= set(c) for c in caches.values())


def test_human_report(capsys, tmp_path):
    eng = cpu_engine(tmp_path)
    assert main(["doctor", eng, "--skip-triton-check"]) == 0
    out = capsys.readouterr().out
    for line in ("Environment", "python", "CUDA", "cuDNN", "cuBLAS", "Triton", "Caches", "timing_cache.json"):
        assert line in out
    assert f"runs here on cpu: {eng}" in out


def test_cpu_engine_runs_here(capsys, tmp_path):
    eng = cpu_engine(tmp_path)
    rc, doc = doctor_json(capsys, eng)
    (r,) = doc["engines"]
    assert rc == 0 and r["will_run"] and r["device"] == "cpu" and r["problems"] == []
    assert r["built"]["device"] == "cpu" and r["built"]["precision"] == "fp32"


def test_engine_from_a_gpu_on_this_cpu_machine(capsys, tmp_path, monkeypatch):
    eng = h200_engine(tmp_path)
    monkeypatch.setattr(environment, "probe_host", lambda **kw: _cpu_host(kw))  # as on the CPU CI machine
    rc, doc = doctor_json(capsys, eng)
    assert rc == 1 and doc["ok"] is False
    (r,) = doc["engines"]
    assert not r["will_run"] and r["device"] is None
    (p,) = r["problems"]
    assert p["code"] == "no_gpu" and p["severity"] == "error"
    assert "built for CUDA on NVIDIA H200 (sm 9.0)" in p["reason"] and "CPU-only build" in p["reason"]
    assert f"ember build am.onnx --rebuild-from {eng} --device cpu" in p["remedy"]



def _cpu_host(kw):
    host = _REAL_PROBE(**kw)
    host.update({"torch": "2.13.0+cpu", "gpus": [],
                 "cuda": {"runtime": None, "unavailable": "torch 2.13.0+cpu is a CPU-only build"}})
    return host


def test_engine_from_another_gpu_names_both_gpus(capsys, tmp_path, monkeypatch):
    eng = h200_engine(tmp_path)
    monkeypatch.setattr(environment, "probe_host", lambda **kw: a100_host())
    rc, doc = doctor_json(capsys, eng)
    (r,) = doc["engines"]
    assert rc == 1 and not r["will_run"]
    assert [p["code"] for p in r["problems"]] == ["gpu_model", "capability"]
    model, cap = r["problems"]
    assert model["reason"] == "built and tuned on NVIDIA H200; this GPU is NVIDIA A100-SXM4-80GB"
    assert "compute capability 9.0 (sm_90)" in cap["reason"] and "has 8.0 (sm_80)" in cap["reason"]
    assert f"ember build am.onnx --rebuild-from {eng} -o {eng}" in model["remedy"]
    # human form: the verdict, the reason and the remedy
    assert main(["doctor", eng]) == 1
    out = capsys.readouterr().out
    assert "will not run here" in out and "this GPU is NVIDIA A100-SXM4-80GB" in out and "--rebuild-from" in out
    # --allow-other-gpu: runs, with warnings
    rc, doc = doctor_json(capsys, eng, "--allow-other-gpu")
    assert rc == 0 and {p["severity"] for p in doc["engines"][0]["problems"]} == {"warning"}


def test_a_second_gpu_that_fits_is_named(capsys, tmp_path, monkeypatch):
    eng = h200_engine(tmp_path)
    host = a100_host()
    host["gpus"].append({"index": 1, "name": "NVIDIA H200", "capability": "9.0", "memory_total_bytes": 140 * 2**30})
    monkeypatch.setattr(environment, "probe_host", lambda **kw: host)
    rc, doc = doctor_json(capsys, eng)
    (r,) = doc["engines"]
    assert rc == 0 and r["will_run"] and r["device"] == "cuda:1"
    assert [p["code"] for p in r["problems"]] == ["other_gpu"] and "cuda:1" in r["problems"][0]["remedy"]
    rc, doc = doctor_json(capsys, eng, "--device", "cuda:0")
    assert rc == 1


def test_engine_from_other_versions(capsys, tmp_path, monkeypatch):
    from ember.kernels import kernel_store

    built_triton = kernel_store.triton_version()
    if built_triton is None:
        pytest.skip("triton is not installed: engines record no kernels without it")
    eng = h200_engine(tmp_path, kernels=True)
    monkeypatch.setattr(environment, "probe_host", lambda **kw: a100_host(
        torch="2.12.0+cu130", triton="0.0.1",
        gpus=[{"index": 0, "name": "NVIDIA H200", "capability": "9.0", "memory_total_bytes": 140 * 2**30}]))
    rc, doc = doctor_json(capsys, eng)
    (r,) = doc["engines"]
    assert rc == 0 and r["will_run"]  # other versions: runs, as warnings with the versions to install
    by_code = {p["code"]: p for p in r["problems"]}
    assert set(by_code) == {"torch_version", "triton_version"}
    assert "torch 2.11.0+cu130" in by_code["torch_version"]["reason"]
    assert "pip install torch==2.11.0" in by_code["torch_version"]["remedy"]
    assert f"pip install triton=={built_triton}" in by_code["triton_version"]["remedy"]
    assert "compiled again on first use" in by_code["triton_version"]["reason"]


def test_lost_kernel_members(capsys, tmp_path, monkeypatch):
    import zipfile

    from .helpers import KERNEL_HASH
    eng = h200_engine(tmp_path, kernels=True)
    cut = str(tmp_path / "cut.engine")
    with zipfile.ZipFile(eng) as src, zipfile.ZipFile(cut, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith(".cubin"):
                dst.writestr(info, src.read(info))
    host = a100_host(gpus=[{"index": 0, "name": "NVIDIA H200", "capability": "9.0"}])
    monkeypatch.setattr(environment, "probe_host", lambda **kw: host)
    rc, doc = doctor_json(capsys, cut)
    codes = [p["code"] for p in doc["engines"][0]["problems"]]
    assert rc == 1 and "kernels_missing" in codes
    (p,) = [p for p in doc["engines"][0]["problems"] if p["code"] == "kernels_missing"]
    assert f"kernels/{KERNEL_HASH}/add_kernel.cubin" in p["reason"]


def test_newer_engine_format(capsys, tmp_path):
    eng = rewrite_manifest(cpu_engine(tmp_path), str(tmp_path / "future.engine"), format_version=99,
                           ember_version="9.9.9")
    rc, doc = doctor_json(capsys, eng)
    (p,) = doc["engines"][0]["problems"]
    assert rc == 1 and p["code"] == "format_version"
    assert "engine format version 99 (written by ember 9.9.9)" in p["reason"] and "ember==9.9.9" in p["remedy"]


def test_damaged_and_unreadable_files(capsys, tmp_path):
    eng = cpu_engine(tmp_path)
    damaged = flip_last_byte(eng, str(tmp_path / "damaged.engine"), "weights.safetensors")
    junk = tmp_path / "junk.engine"
    junk.write_bytes(b"not a zip at all")
    rc, doc = doctor_json(capsys, damaged, str(junk))
    assert rc == 1
    edited, bad = doc["engines"]
    assert [p["code"] for p in edited["problems"]] == ["damaged"]
    assert "weights.safetensors" in edited["problems"][0]["reason"]
    assert [p["code"] for p in bad["problems"]] == ["unreadable"] and "not a zip" in bad["problems"][0]["reason"]
    rc, doc = doctor_json(capsys, damaged, "--fast")  # the manifest alone looks fine: --fast reads no member
    assert rc == 0


def test_folders_are_searched_for_engines(capsys, tmp_path):
    repo = tmp_path / "models" / "am" / "1"
    repo.mkdir(parents=True)
    cpu_engine(tmp_path, name="models/am/1/model.engine")
    rc, doc = doctor_json(capsys, str(tmp_path / "models"))
    assert rc == 0 and [os.path.basename(r["path"]) for r in doc["engines"]] == ["model.engine"]
    (tmp_path / "empty").mkdir()
    assert main(["doctor", str(tmp_path / "empty")]) == 2  # a usage error, named
    assert "no *.engine file" in capsys.readouterr().err


def test_signed_engine_needs_its_key(capsys, tmp_path):
    import inspect

    import ember
    if "sign_key" not in inspect.signature(ember.Engine.save).parameters:
        pytest.skip("engine signing has not landed in this tree")
    key = tmp_path / "engine.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    path = str(tmp_path / "signed.engine")
    ember.build(onnx_model_path(tmp_path), device="cpu").save(path, sign_key=str(key))
    rc, doc = doctor_json(capsys, path)
    assert rc == 1 and [p["code"] for p in doc["engines"][0]["problems"]] == ["signature_required"]
    rc, doc = doctor_json(capsys, path, "--verify-key", str(key))
    assert rc == 0, doc["engines"][0]["problems"]
    other = tmp_path / "other.key"
    other.write_text("fedcba9876543210fedcba9876543210\n")
    other.chmod(0o600)
    rc, doc = doctor_json(capsys, path, "--verify-key", str(other))
    assert rc == 1 and doc["engines"][0]["problems"][0]["code"] == "signature"


def onnx_model_path(tmp_path):
    from .helpers import onnx_model

    return onnx_model(tmp_path)


def test_nvml_details_and_a_cpu_torch_beside_gpus(monkeypatch):
    """NVML is read when nvidia-ml-py is installed: a fake pynvml module stands in for the driver."""
    class Mem:
        total, used = 150_000_000_000, 1_000_000_000

    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "580.159.04", nvmlSystemGetCudaDriverVersion=lambda: 13000,
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: ("h", i),
        nvmlDeviceGetName=lambda h: b"NVIDIA H200", nvmlDeviceGetUUID=lambda h: "GPU-1234",
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0), nvmlDeviceGetMemoryInfo=lambda h: Mem(),
        nvmlDeviceGetClockInfo=lambda h, c: {1: 1980, 2: 3201}[c],
        nvmlDeviceGetMaxClockInfo=lambda h, c: {1: 1980, 2: 3201}[c],
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = environment._nvml_info()
    assert info["available"] and info["driver"] == "580.159.04" and info["driver_cuda"] == "13.0"
    (g,) = info["gpus"]
    assert g["name"] == "NVIDIA H200" and g["capability"] == "9.0" and g["memory_total_bytes"] == Mem.total
    assert g["clocks_mhz"] == {"sm": 1980, "sm_max": 1980, "memory": 3201, "memory_max": 3201}
    assert g["power_limit_w"] == 700
    import torch
    if torch.version.cuda is None:  # a CPU build of torch on a machine with an NVIDIA GPU: said out loud
        host = environment.probe_host(triton_check=False)
        assert host["gpus"][0]["name"] == "NVIDIA H200" and host["gpus"][0]["source"] == "nvml"
        from ember.runtime.compat import check_host
        assert [p.code for p in check_host(host)] == ["torch_cpu_build"]


def test_nvml_that_fails_to_initialize_is_reported(monkeypatch):
    def fail():
        raise RuntimeError("NVML Shared Library Not Found")
    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=fail))
    info = environment._nvml_info()
    assert info == {"available": False, "reason": "NVML did not initialize: NVML Shared Library Not Found"}
