"""deploy/k8s validates offline: built-in kinds against the Kubernetes schemas (kubernetes-validate,
strict), ServiceMonitor/ServingRuntime/InferenceService against their vendored CRDs; and the
manifests agree with the server (probes, ports, drain timeout, metrics the autoscaler reads)."""
from __future__ import annotations

import copy
import re

import pytest

from . import kube

pytest.importorskip("kubernetes_validate", reason="the [dev] extra installs kubernetes-validate")

OVERLAYS = ["base", "overlays/h200", "overlays/cpu"]
FILES = ["kserve/servingruntime.yaml", "kserve/inferenceservice.yaml", "prometheus-adapter/adapter-config.yaml"]


def rendered(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in kube.render(kube.K8S / name)}


@pytest.mark.parametrize("version", [kube.K8S_VERSION, kube.K8S_NEWEST])
@pytest.mark.parametrize("name", OVERLAYS)
def test_kustomizations_validate(name, version):
    docs = kube.render(kube.K8S / name)
    assert {"Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler"} <= {d["kind"] for d in docs}
    for d in docs:
        kube.validate(d, version)


@pytest.mark.parametrize("path", FILES)
def test_kserve_and_adapter_validate(path):
    docs = kube.load_docs(kube.K8S / path)
    assert docs
    for d in docs:
        kube.validate(d)


def test_vendored_crds_are_the_published_files():
    table = kube.crd_sha256_table()
    files = sorted(p.name for p in kube.CRDS.glob("*.yaml"))
    assert sorted(table) == files and len(files) == 3
    for name in files:
        assert kube.sha256(kube.CRDS / name) == table[name], f"{name} differs from the published CRD"


@pytest.mark.parametrize("kind, edit, message", [
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenesProbe={}), "livenesProbe"),
    ("Deployment", lambda d: d["spec"].update(replicas="two"), "replicas"),
    ("HorizontalPodAutoscaler", lambda d: d["spec"]["metrics"][0]["pods"].update(metrics={}), "metrics"),
    ("HorizontalPodAutoscaler", lambda d: d["spec"].update(minReplicas="one"), "one"),
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="10s"), "intervall"),
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="10 seconds"), "10 seconds"),
])
def test_the_validation_catches_mistakes(kind, edit, message):
    doc = copy.deepcopy(rendered("base")[kind])
    edit(doc)
    with pytest.raises(Exception, match=re.escape(message)):
        kube.validate(doc)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["spec"].update(multiModel="no"), "no"),
    (lambda d: d["spec"]["containers"][0].update(imag="x"), "imag"),
])
def test_the_crd_validation_catches_mistakes(edit, message):
    doc = kube.load_docs(kube.K8S / "kserve/servingruntime.yaml")[0]
    edit(doc)
    with pytest.raises(Exception, match=re.escape(message)):
        kube.validate(doc)


def _pod(name="base"):
    return rendered(name)["Deployment"]["spec"]["template"]["spec"]


def _arg(args: list[str], flag: str) -> str:
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag:
            return args[i + 1]
    raise AssertionError(f"{flag} not in {args}")


def test_probes_ports_and_gpu_requests():
    pod = _pod()
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = c["args"]
    assert ports == {"http": int(_arg(args, "--http-port")), "grpc": int(_arg(args, "--grpc-port")),
                     "metrics": int(_arg(args, "--metrics-port"))}
    assert _arg(args, "--host") == "0.0.0.0"
    for container in pod["initContainers"] + pod["containers"]:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0


def test_grace_period_covers_prestop_and_the_servers_drain():
    from ember.cli.serve import serve_cmd

    pod = _pod()
    (c,) = pod["containers"]
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(_arg(c["args"], "--drain-timeout"))
    default = next(p.default for p in serve_cmd.params if p.name == "drain_timeout")
    assert drain == default, "the manifest's drain timeout should be the server's default, said out loud"
    grace = pod["terminationGracePeriodSeconds"]
    assert sleep + drain + 5 <= grace <= sleep + drain + 30


def test_engines_come_from_a_volume_or_an_init_container_and_are_checked_not_built():
    for name in OVERLAYS:
        pod = _pod(name)
        (c,) = pod["containers"]
        assert c["args"][0] == "/models"
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        inits = [i["name"] for i in pod.get("initContainers", [])]
        if "persistentVolumeClaim" in volume:
            assert inits == ["doctor"]
        else:  # an emptyDir filled by the engines image, then checked
            assert "emptyDir" in volume and inits == ["engines", "doctor"]
        doctor = pod["initContainers"][-1]
        assert doctor["command"][:3] == ["ember", "doctor", "/models"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert "build" not in " ".join(container.get("command", []) + container.get("args", []))


def test_h200_overlay_pins_the_gpu_and_cpu_overlay_drops_it():
    h200 = rendered("overlays/h200")
    pod = h200["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert "PersistentVolumeClaim" not in h200 and h200["Deployment"]["metadata"]["namespace"] == "inference"
    assert pod["containers"][0]["image"] == "registry.example.com/ember:0.1.0-cu130"
    assert "nvidia" not in str(_pod("overlays/cpu")["containers"]) and \
        _pod("overlays/cpu")["containers"][0]["image"].endswith(":0.1.0-cpu")


def test_service_monitor_and_hpa_point_at_what_exists():
    r = rendered("base")
    svc, sm, hpa, dep = r["Service"], r["ServiceMonitor"], r["HorizontalPodAutoscaler"], r["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ember"}
    (metric,) = hpa["spec"]["metrics"]
    adapter = kube.load_docs(kube.K8S / "prometheus-adapter/adapter-config.yaml")[0]
    rules = kube.yaml.safe_load(adapter["data"]["config.yaml"])
    published = {rule["name"]["as"]: rule for rule in rules["rules"]}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in published
    helm = kube.load_docs(kube.K8S / "prometheus-adapter/values.yaml")[0]
    assert helm["rules"]["custom"] == rules["rules"], "the Helm values and the ConfigMap must carry the same rules"


def test_kserve_runtime_serves_the_v2_protocol_from_mnt_models():
    sr = kube.load_docs(kube.K8S / "kserve/servingruntime.yaml")[0]
    isvc = kube.load_docs(kube.K8S / "kserve/inferenceservice.yaml")[0]
    (c,) = sr["spec"]["containers"]
    assert c["args"][0] == "/mnt/models" and {"v2", "grpc-v2"} <= set(sr["spec"]["protocolVersions"])
    assert int(_arg(c["args"], "--http-port")) == c["ports"][0]["containerPort"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == sr["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in sr["spec"]["supportedModelFormats"]}
