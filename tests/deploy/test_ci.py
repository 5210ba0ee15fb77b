"""deploy/ci: the workflow builds on a runner per GPU type, checks with `ember compare`, and names
its artifacts after the engine manifest's own fields (engine_name.py)."""
from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import yaml

from .helpers import cpu_engine, h200_engine

CI = Path(__file__).resolve().parents[2] / "deploy" / "ci"


def engine_name():
    spec = importlib.util.spec_from_file_location("engine_name", CI / "engine_name.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_artifact_name_is_the_manifests(tmp_path, capsys):
    eng = h200_engine(tmp_path, kernels=True, precision="fp16")
    mod = engine_name()
    assert mod.main([eng, "--model", "ResNet50"]) == 0
    name = capsys.readouterr().out.strip()
    from ember.kernels import kernel_store
    triton = kernel_store.triton_version()
    assert name == f"resnet50-ember0.1.0-nvidia-h200-sm90-fp16-torch2.11.0-triton{triton}-cuda13.0"
    out = tmp_path / "github_output"
    import os
    os.environ["GITHUB_OUTPUT"] = str(out)
    try:
        assert mod.main([eng, "--model", "resnet50", "--json", "--github-output"]) == 0
    finally:
        del os.environ["GITHUB_OUTPUT"]
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpu"] == "NVIDIA H200" and doc["capability"] == "9.0" and doc["torch"] == "2.11.0"
    assert f"name={name}\n" in out.read_text() and "capability=9.0\n" in out.read_text()


def test_cpu_engine_name(tmp_path, capsys):
    import torch

    assert engine_name().main([cpu_engine(tmp_path), "--model", "am"]) == 0
    release = torch.__version__.split("+")[0]
    assert capsys.readouterr().out.strip() == f"am-ember0.1.0-cpu-fp32-torch{release}"


def test_a_manifest_without_the_gpu_is_not_named(tmp_path):
    eng = h200_engine(tmp_path, build_host={"torch": "2.11.0"})
    with pytest.raises(SystemExit, match="lacks build_host.gpu.name, build_host.gpu.capability"):
        engine_name().main([eng, "--model", "m"])


def test_workflow_builds_per_gpu_checks_and_publishes_by_manifest_name():
    wf = yaml.safe_load((CI / "build-engines.yml").read_text())
    job = wf["jobs"]["engine"]
    gpus = job["strategy"]["matrix"]["include"]
    assert len(gpus) >= 2 and all(f"gpu-{g['gpu']}" in g["runner"] for g in gpus)
    assert job["runs-on"] == "${{ matrix.runner }}"
    runs = [s.get("run", "") for s in job["steps"]]
    script = "\n".join(runs)
    assert "ember build" in script and "ember compare" in script and "ember doctor" in script
    build = next(i for i, r in enumerate(runs) if "ember build" in r)
    compare = next(i for i, r in enumerate(runs) if "ember compare" in r)
    upload = next(i for i, s in enumerate(job["steps"]) if s.get("uses", "").startswith("actions/upload-artifact"))
    assert build < compare < upload, "the engine is checked before it is published"
    assert job["steps"][upload]["with"]["name"] == "${{ steps.name.outputs.name }}"
    assert "engine_name.py build/model.engine" in script
    assert "--constraint constraints.txt" in script


def test_workflow_flags_are_ember_flags():
    import click

    from ember.cli.main import cli

    wf = yaml.safe_load((CI / "build-engines.yml").read_text())
    seen = set()
    for step in wf["jobs"]["engine"]["steps"]:
        for line in step.get("run", "").splitlines():
            line = line.split(" > ")[0].strip()
            if line.startswith("ember "):
                argv = shlex.split(line.replace("$BUILD_FLAGS", wf["env"]["BUILD_FLAGS"]))[1:]
                cmd = cli.get_command(click.Context(cli), argv[0])
                known = {o for p in cmd.params for o in p.opts + p.secondary_opts}
                flags = {a for a in argv[1:] if a.startswith("--")}
                assert flags <= known, f"ember {argv[0]} has no {sorted(flags - known)}"
                seen.add(argv[0])
    assert seen == {"build", "compare", "doctor"}
