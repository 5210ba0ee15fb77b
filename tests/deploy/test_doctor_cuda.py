"""`ember doctor` on a real GPU (skipped without one): the machine as NVML and torch see it, the
Triton compiler check, and engines built here and elsewhere. Run on the device machine with
`python3 -m pytest -q tests/deploy/test_doctor_cuda.py`."""
from __future__ import annotations

import json

import pytest

from ember.cli.main import main

from .helpers import onnx_model

pytestmark = pytest.mark.cuda


def doctor_json(capsys, *args):
    rc = main(["doctor", "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


def test_environment_on_the_gpu(capsys):
    import torch

    rc, doc = doctor_json(capsys)
    host = doc["host"]
    assert rc == 0 and "unavailable" not in host["cuda"], host["cuda"]
    assert host["cuda"]["runtime"] == torch.version.cuda and host["cuda"]["driver"]
    g = host["gpus"][0]
    p = torch.cuda.get_device_properties(0)
    assert g["name"] == p.name and g["capability"] == f"{p.major}.{p.minor}"
    assert g["memory_total_bytes"] == p.total_memory
    if host["nvml"]["available"]:  # nvidia-ml-py installed: clocks come from NVML
        assert g["source"] == "torch+nvml" and g["clocks_mhz"]["sm_max"] > 0
    assert host["libraries"]["cudnn"]["version"] and host["libraries"]["cublas"]["version"]
    tc = host["triton_compile"]
    assert tc["ran"] and tc["ok"], tc


def test_engine_built_here_runs_here_and_one_from_another_gpu_does_not(capsys, tmp_path):
    import ember

    engine = ember.build(onnx_model(tmp_path), device="cuda", precision="fp16", shapes={"x": (8, 4)})
    here = str(tmp_path / "here.engine")
    engine.save(here)
    rc, doc = doctor_json(capsys, here, "--skip-triton-check")
    (r,) = doc["engines"]
    assert rc == 0 and r["will_run"] and r["device"] == "cuda:0", r["problems"]
    engine.manifest["build_host"] = {**engine.manifest["build_host"],
                                     "gpu": {"name": "NVIDIA Imaginary X1", "capability": "12.7", "cuda": "13.0"}}
    other = str(tmp_path / "other.engine")
    engine.save(other)
    rc, doc = doctor_json(capsys, other, "--skip-triton-check")
    codes = [p["code"] for p in doc["engines"][0]["problems"]]
    assert rc == 1 and codes[:2] == ["gpu_model", "capability"]
    with pytest.raises(ember.EmberError, match="NVIDIA Imaginary X1"):  # Engine.load refuses it too
        ember.Engine.load(other)
