"""runtime/compat.py: pure checks of an engine's manifest against a host description."""
from __future__ import annotations

import itertools

import pytest

from ember.errors import EngineFileError
from ember.runtime import compat
from ember.runtime.engine import check_same_gpu

H200 = {"name": "NVIDIA H200", "capability": "9.0", "cuda": "13.0"}


def cuda_manifest(**over):
    m = {"format": "ember-engine", "format_version": 2, "ember_version": "0.1.0", "torch_version": "2.11.0+cu130",
         "device": "cuda", "backend": "reference", "precision": "fp16", "source": {"file": "resnet50.onnx"},
         "build_host": {"torch": "2.11.0+cu130", "gpu": dict(H200)},
         "kernels": {"triton": "3.6.0", "count": 2},
         "members": {"graph.json": {}, "weights.safetensors": {},
                     "kernels/" + "a" * 64 + "/k.json": {}, "kernels/" + "a" * 64 + "/k.cubin": {}},
         "memory": {"weights_mib": 50.0, "activations_peak_mib": 20.0}}
    m.update(over)
    return m


def gpu_host(name="NVIDIA H200", capability="9.0", **over):
    h = {"ember": "0.1.0", "torch": "2.11.0+cu130", "triton": "3.6.0", "engine_format": 2, "backends": ["reference"],
         "cuda": {"runtime": "13.0", "driver": "580.159.04", "driver_cuda": "13.0"},
         "gpus": [{"index": 0, "name": name, "capability": capability, "memory_total_bytes": 150 * 2**30}],
         "c_compiler": "/usr/bin/gcc", "python_headers": True}
    h.update(over)
    return h


CPU_HOST = {"ember": "0.1.0", "torch": "2.13.0+cpu", "triton": "3.9.0", "engine_format": 2, "backends": ["reference"],
            "cuda": {"runtime": None, "unavailable": "torch 2.13.0+cpu is a CPU-only build"}, "gpus": []}


def codes(problems, severity=None):
    return [p.code for p in problems if severity is None or p.severity == severity]


def test_same_gpu_and_versions_is_clean():
    assert compat.check_engine(cuda_manifest(), gpu_host()) == []


def test_other_gpu_model_and_capability_are_named_with_the_remedy():
    ps = compat.check_engine(cuda_manifest(), gpu_host("NVIDIA A100-SXM4-80GB", "8.0"), engine="r.engine")
    assert codes(ps, compat.ERROR) == ["gpu_model", "capability"]
    model, cap = ps
    assert "NVIDIA H200" in model.reason and "NVIDIA A100-SXM4-80GB" in model.reason
    assert "9.0" in cap.reason and "8.0" in cap.reason and "sm_90" in cap.reason
    assert "ember build resnet50.onnx --rebuild-from r.engine" in model.remedy
    assert not compat.will_run(ps)


def test_allow_other_gpu_turns_the_gpu_errors_into_warnings():
    ps = compat.check_engine(cuda_manifest(), gpu_host("NVIDIA A100-SXM4-80GB", "8.0"), allow_other_gpu=True)
    assert codes(ps, compat.WARNING) == ["gpu_model", "capability"] and compat.will_run(ps)


def test_cpu_only_torch_cannot_run_a_cuda_engine():
    (p,) = compat.check_engine(cuda_manifest(), CPU_HOST, engine="e.engine")
    assert p.code == "no_gpu" and p.severity == compat.ERROR
    assert "NVIDIA H200" in p.reason and "CPU-only build" in p.reason
    assert "--rebuild-from e.engine --device cpu" in p.remedy


def test_gpus_that_torch_cannot_use_count_as_none():
    host = gpu_host(cuda={"runtime": "13.0", "driver_cuda": "12.4", "unavailable": "driver supports CUDA 12.4"})
    assert codes(compat.check_engine(cuda_manifest(), host)) == ["no_gpu"]


def test_cpu_engine_runs_on_cpu_and_is_untuned_on_a_gpu():
    m = cuda_manifest(device="cpu", build_host={"torch": "2.13.0+cpu"}, kernels=None)
    assert compat.check_engine(m, CPU_HOST) == []
    assert codes(compat.check_engine(m, gpu_host()), compat.WARNING) == ["untuned_for_gpu"]


def test_newer_and_older_engine_format_versions():
    (p,) = compat.check_engine(cuda_manifest(format_version=3, ember_version="0.3.0"), gpu_host())
    assert p.code == "format_version" and "version 3" in p.reason and "reads version 2" in p.reason
    assert "pip install" not in p.remedy and "ember==0.3.0" in p.remedy
    (p,) = compat.check_engine(cuda_manifest(format_version=1), gpu_host())
    assert p.code == "format_version" and "version 1" in p.reason and "rebuild" in p.remedy


def test_not_an_engine():
    assert codes(compat.check_engine({"format": "something"}, gpu_host())) == ["not_an_engine"]
    assert codes(compat.check_engine([1, 2], gpu_host())) == ["not_an_engine"]


def test_unknown_backend():
    (p,) = compat.check_engine(cuda_manifest(backend="tensorrt"), gpu_host())
    assert p.code == "backend" and "'tensorrt'" in p.reason


def test_triton_version_differs_is_a_warning_and_missing_triton_an_error():
    (p,) = compat.check_engine(cuda_manifest(), gpu_host(triton="3.5.1"))
    assert (p.code, p.severity) == ("triton_version", compat.WARNING)
    assert "3.6.0" in p.reason and "3.5.1" in p.reason and "triton==3.6.0" in p.remedy
    (p,) = compat.check_engine(cuda_manifest(), gpu_host(triton=None))
    assert (p.code, p.severity) == ("triton_missing", compat.ERROR) and "pip install triton==3.6.0" == p.remedy


def test_torch_and_cuda_version_differences_are_warnings_with_versions_to_install():
    ps = compat.check_engine(cuda_manifest(), gpu_host(torch="2.12.0+cu128",
                                                      cuda={"runtime": "12.8", "driver_cuda": "13.0"}))
    assert codes(ps, compat.WARNING) == ["torch_version", "cuda_version"] and compat.will_run(ps)
    assert "torch==2.11.0" in ps[0].remedy and "2.12.0+cu128" in ps[0].reason


def test_engine_from_a_newer_ember_is_a_warning():
    (p,) = compat.check_engine(cuda_manifest(ember_version="0.10.0"), gpu_host(ember="0.9.2"))
    assert p.code == "ember_version" and "ember==0.10.0" in p.remedy


def test_kernel_members_lost_from_the_file():
    m = cuda_manifest()
    present = ["manifest.json", "digest.json", "graph.json", "weights.safetensors"]
    (p,) = compat.check_engine(m, gpu_host(), members=present)
    assert p.code == "kernels_missing" and p.severity == compat.ERROR and "2 compiled-kernel" in p.reason
    assert compat.check_engine(m, gpu_host(), members=present + list(m["members"])[2:]) == []


def test_generated_kernels_need_a_c_compiler():
    (p,) = compat.check_engine(cuda_manifest(), gpu_host(c_compiler=None))
    assert p.code == "c_compiler" and "gcc" in p.remedy


def test_precision_and_memory_against_the_gpu():
    bf16 = cuda_manifest(precision="bf16", build_host={"gpu": {"name": "Tesla T4", "capability": "7.5"}})
    assert codes(compat.check_engine(bf16, gpu_host("Tesla T4", "7.5"))) == ["precision"]
    big = cuda_manifest(memory={"weights_mib": 200_000.0, "activations_peak_mib": 1.0})
    (p,) = compat.check_engine(big, gpu_host())
    assert p.code == "gpu_memory" and "200,001 MiB" in p.reason


def test_signatures():
    assert codes(compat.check_engine(cuda_manifest(), gpu_host(verify_key=False), signed=True)) == \
        ["signature_required"]
    assert codes(compat.check_engine(cuda_manifest(), gpu_host(verify_key=True), signed=False)) == \
        ["signature_required"]
    assert compat.check_engine(cuda_manifest(), gpu_host(verify_key=True), signed=True) == []
    assert compat.check_engine(cuda_manifest(), gpu_host(), signed=True) == []  # no policy given: no verdict


@pytest.mark.parametrize("field, value", [
    ("build_host", [1, 2]), ("build_host", {"gpu": "H200"}), ("kernels", "3.6.0"), ("tactics", [1]),
    ("memory", {"weights_mib": "big"}), ("members", None), ("ember_version", 7), ("precision", None),
    ("source", "x.onnx"), ("torch_version", {"a": 1}),
])
def test_malformed_fields_never_raise(field, value):
    ps = compat.check_engine(cuda_manifest(**{field: value}), gpu_host(), members=["graph.json"])
    assert all(isinstance(p, compat.Problem) for p in ps)


def test_host_problems():
    assert compat.check_host(CPU_HOST) == []
    old_driver = gpu_host(cuda={"runtime": "13.0", "driver": "550.54", "driver_cuda": "12.4"})
    (p,) = compat.check_host(old_driver)
    assert p.code == "cuda_driver" and "12.4" in p.reason and "13.0" in p.reason
    cpu_torch = gpu_host(cuda={"runtime": None, "unavailable": "CPU-only build"})
    assert codes(compat.check_host(cpu_torch)) == ["torch_cpu_build"]
    failed = gpu_host(triton_compile={"ran": True, "ok": False, "error": "ptxas fatal"})
    assert codes(compat.check_host(failed)) == ["triton_compile"]


def test_require_runnable_names_every_error():
    ps = compat.check_engine(cuda_manifest(), gpu_host("NVIDIA L4", "8.9"))
    with pytest.raises(EngineFileError, match="will not run here") as e:
        compat.require_runnable(ps, "m.engine")
    assert "NVIDIA L4" in str(e.value) and "8.9" in str(e.value)
    compat.require_runnable(compat.check_engine(cuda_manifest(), gpu_host()), "m.engine")


NAMES, CAPS = ["NVIDIA H200", "NVIDIA A100-SXM4-80GB", None], ["9.0", "8.0", None]


@pytest.mark.parametrize("built_name, built_cap, name, cap",
                         [c for c in itertools.product(NAMES, CAPS, NAMES[:2], CAPS[:2])])
def test_engine_load_gpu_check_is_a_subset(built_name, built_cap, name, cap):
    """Whenever Engine.load's check_same_gpu refuses, compat reports an error (so Engine.load can use it)."""
    gpu = {k: v for k, v in (("name", built_name), ("capability", built_cap)) if v is not None}
    m = cuda_manifest(build_host={"gpu": gpu} if gpu else {})
    try:
        check_same_gpu(m, name, cap, "e.engine")
        refused = False
    except EngineFileError:
        refused = True
    host = compat.host_for_gpu(name, cap)
    if refused:
        assert set(codes(compat.gpu_problems(m, host["gpus"][0]), compat.ERROR)) & {"gpu_model", "capability"}
        assert not compat.will_run(compat.check_engine(m, host))
