"""Offline checks of Kubernetes manifests: a small kustomize (the features deploy/k8s uses), the
Kubernetes schemas of `kubernetes-validate` for built-in kinds, and vendored CRD schemas (crds/)
for ServiceMonitor, ServingRuntime and InferenceService."""
from __future__ import annotations

import copy
import functools
import hashlib
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS = Path(__file__).resolve().parent / "crds"
# The Kubernetes version the manifests are validated for: the oldest release they are written for
# (sidecar-free, autoscaling/v2, policy/v1). kubernetes-validate ships its schemas, so no network.
K8S_VERSION = "1.29.0"
K8S_NEWEST = "1.37.0"  # and the newest schemas the pinned kubernetes-validate ships
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_docs(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_LOADER) if d]


# -- kustomize: resources, images, namespace, labels, patches (JSON 6902, and $patch: delete) --------

def render(directory: Path) -> list[dict[str, Any]]:
    kz = load_docs(directory / "kustomization.yaml")[0]
    known = {"apiVersion", "kind", "resources", "images", "namespace", "labels", "patches"}
    assert set(kz) <= known, f"{directory}: kustomization uses {set(kz) - known}, which these tests do not render"
    docs: list[dict[str, Any]] = []
    for res in kz.get("resources", []):
        p = directory / res
        docs += render(p) if p.is_dir() else load_docs(p)
    for patch in kz.get("patches", []):
        body = yaml.safe_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
        targets = [d for d in docs if _matches(d, patch["target"])]
        assert targets, f"{directory}: patch target {patch['target']} matches no resource"
        for d in targets:
            if isinstance(body, dict) and body.get("$patch") == "delete":
                docs.remove(d)
            else:
                assert isinstance(body, list), f"{directory}: only JSON 6902 patches and $patch: delete are rendered"
                _json6902(d, body)
    for img in kz.get("images", []):
        for d in docs:
            for c in _containers(d):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    for group in kz.get("labels", []):
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    if "namespace" in kz:
        for d in docs:
            if d["kind"] not in ("Namespace", "CustomResourceDefinition"):
                d["metadata"]["namespace"] = kz["namespace"]
    return docs


def _matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    return all((doc["kind"] if k == "kind" else doc["metadata"].get(k)) == v for k, v in target.items())


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if doc["kind"] == "Deployment" else spec
    return list(pod.get("initContainers", [])) + list(pod.get("containers", []))


def _json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].lstrip("/").split("/")]
        parent = doc
        for k in keys[:-1]:
            parent = parent[int(k)] if isinstance(parent, list) else parent[k]
        last = keys[-1]
        if isinstance(parent, list):
            i = len(parent) if last == "-" else int(last)
            {"add": lambda: parent.insert(i, op["value"]), "replace": lambda: parent.__setitem__(i, op["value"]),
             "remove": lambda: parent.pop(i)}[op["op"]]()
        else:
            if op["op"] in ("replace", "remove"):
                assert last in parent, f"{op['op']} {op['path']}: no such field"
            if op["op"] == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])


# -- validation -----------------------------------------------------------------------------------------

def validate(doc: dict[str, Any], version: str = K8S_VERSION) -> None:
    """Raise if ``doc`` is not valid: built-in kinds against Kubernetes' schemas (strict: unknown
    fields are errors, as `kubectl apply --validate=strict` makes them), CRD kinds against the
    vendored CRD's schema, with unknown fields errors too wherever the CRD does not preserve them."""
    group = doc["apiVersion"].split("/")[0]
    if group in CRD_GROUPS:
        crd_validator(doc["kind"], doc["apiVersion"]).validate(doc)
        return
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


CRD_GROUPS = {"monitoring.coreos.com", "serving.kserve.io"}


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    group, version = api_version.split("/")
    for path in sorted(CRDS.glob("*.yaml")):
        crd = load_docs(path)[0]
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    schema = _strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
                    return jsonschema.Draft4Validator(schema)
            raise AssertionError(f"{path.name} has no version {version} of {kind}")
    raise AssertionError(f"no vendored CRD for {kind} ({api_version}) in {CRDS}")


def _strict(schema: Any) -> Any:
    """OpenAPI v3 (as Kubernetes reads it) -> JSON Schema: `nullable` admits null; objects with listed
    properties and no x-kubernetes-preserve-unknown-fields refuse other fields (the API server would
    prune them silently, and `kubectl --validate=strict` refuses them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    return out


def crd_sha256_table() -> dict[str, str]:
    """file -> sha256, from crds/README.md."""
    rows = re.findall(r"^\| `([^`]+\.yaml)` \|.*\| ([0-9a-f]{64}) \|$", (CRDS / "README.md").read_text(), re.M)
    return dict(rows)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
