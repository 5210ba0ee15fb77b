"""deploy/docker: the Dockerfiles parsed with dockerfile-parse (pinned bases and versions, the
non-root user, HEALTHCHECK, entrypoint), constraints.txt, and the compose stack's wiring."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="the [dev] extra installs dockerfile-parse")


def parsed(name: str):
    # from a file object: the parser takes a path not ending in "Dockerfile" for a folder
    with open(DOCKER / name, "rb") as f:
        return dockerfile_parse.DockerfileParser(fileobj=f, cache_content=True)


def instructions(name: str, what: str) -> list[str]:
    return [i["value"] for i in parsed(name).structure if i["instruction"] == what]


def final_stage(name: str) -> list[dict]:
    structure = parsed(name).structure
    last_from = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return structure[last_from:]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+]*", version), f"constraints.txt: '{line}' is not N==V"
            pins[name.lower()] = version
    return pins


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_a_full_version_tag(name):
    df = parsed(name)
    args = {}
    for value in instructions(name, "ARG"):
        key, _, default = value.partition("=")
        args[key] = default
    froms = instructions(name, "FROM")
    assert len(froms) >= 2, "a multi-stage build: build and runtime"
    bases = set()
    for value in froms:
        image = value.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        bases.add(image)
    assert len(bases) == 1
    (base,) = bases
    repo, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+-", tag), f"{base}: pin a full version tag"
    if name == "Dockerfile":
        assert repo == "nvidia/cuda" and "-runtime-" in tag, "the GPU image is on a CUDA runtime base"
    assert "@sha256:" in (DOCKER / name).read_text(), "the file says how to pin the digest"
    assert df.baseimage  # dockerfile-parse resolves the final stage's base


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_pip_install_is_constrained_and_the_venv_is_copied(name):
    runs = instructions(name, "RUN")
    pip = [r for r in runs if "pip install" in r]
    assert pip and all("--constraint /tmp/constraints.txt" in r for r in pip)
    assert any(v.startswith("constraints.txt ") for v in instructions(name, "COPY"))
    copies = [v for v in instructions(name, "COPY") if v.startswith("--from=build")]
    assert copies == ["--from=build /opt/ember /opt/ember"]
    pins = constraints()
    for pkg in ("torch", "triton", "onnx", "onnxruntime", "numpy", "safetensors", "protobuf", "grpcio",
                "starlette", "uvicorn", "prometheus-client", "nvidia-ml-py"):
        assert pkg in pins, f"constraints.txt does not pin {pkg}"


def test_constraints_are_the_tested_gpu_versions():
    pins = constraints()
    # the H200 machine of docs/performance.md: torch 2.11.0+cu130, triton 3.6.0, onnx 1.23.1
    assert (pins["torch"], pins["triton"], pins["onnx"]) == ("2.11.0", "3.6.0", "1.23.1")
    assert "cu130" in parsed("Dockerfile").args.get("TORCH_INDEX", "") or \
        any("cu130" in v for v in instructions("Dockerfile", "ARG"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_non_root_user(name):
    stage = final_stage(name)
    users = [i["value"] for i in stage if i["instruction"] == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "a numeric non-root uid (Kubernetes' runAsNonRoot checks it)"
    assert any(f"--uid {uid}" in i["value"] for i in stage if i["instruction"] == "RUN")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_entrypoint_and_volume(name):
    (hc,) = instructions(name, "HEALTHCHECK")
    assert "/v2/health/ready" in hc and "--interval=" in hc and "--start-period=" in hc
    (entry,) = instructions(name, "ENTRYPOINT")
    assert json.loads(entry) == ["ember", "serve"]
    (cmd,) = instructions(name, "CMD")
    args = json.loads(cmd)
    assert args[0] == "/models" and args[args.index("--host") + 1] == "0.0.0.0"
    ports = {args[args.index(f) + 1] for f in ("--http-port", "--grpc-port", "--metrics-port")}
    assert set(instructions(name, "EXPOSE")[0].split()) == ports
    assert re.search(r"127\.0\.0\.1:" + args[args.index("--http-port") + 1], hc)
    assert json.loads(instructions(name, "VOLUME")[0]) == ["/models"]


def test_gpu_image_has_what_triton_compiles_with():
    runtime = " ".join(i["value"] for i in final_stage("Dockerfile") if i["instruction"] == "RUN")
    assert all(pkg in runtime.split() for pkg in ("gcc", "python3-dev"))


def test_compose_stack():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"ember", "prometheus", "grafana"}
    ember = services["ember"]
    assert any(v.endswith(":/models:ro") for v in ember["volumes"])
    assert ember["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    cmd = json.loads(instructions("Dockerfile", "CMD")[0])
    drain = float(cmd[cmd.index("--drain-timeout") + 1])
    assert int(ember["stop_grace_period"].rstrip("s")) > drain
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"ember:{cmd[cmd.index('--metrics-port') + 1]}"]
    for mount in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        src = mount.split(":")[0]
        if src.startswith("./"):
            assert (DOCKER / src).exists(), f"compose mounts {src}, which is not in the repository"
    cpu = yaml.safe_load(re.sub(r"!reset \{\}", "{}", (DOCKER / "compose.cpu.yaml").read_text()))
    assert cpu["services"]["ember"]["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"


def test_dockerignore_lets_in_only_what_the_build_copies():
    for name in DOCKERFILES:
        ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
        allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
        for value in instructions(name, "COPY"):
            if value.startswith("--from"):
                continue
            for src in shlex.split(value)[:-1]:
                assert src.rstrip("/") in allowed, f"{name} copies {src}, which {name}.dockerignore leaves out"
