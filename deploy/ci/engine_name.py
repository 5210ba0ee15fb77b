#!/usr/bin/env python3
"""Name an engine artifact after its manifest's own fields, so that what a deployment pulls says
what it will run on:

    python deploy/ci/engine_name.py build/model.engine --model resnet50
    resnet50-ember0.1.0-nvidia-h200-sm90-fp16-torch2.11.0-triton3.6.0-cuda13.0

The fields come from the engine (never from the CI job's labels): the GPU and compute capability it
was tuned on, its precision, and the ember, torch, Triton and CUDA versions it was built with.
`--github-output` also writes name=... and the fields to $GITHUB_OUTPUT for later steps.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys


def fields(manifest: dict) -> dict[str, str]:
    host = manifest.get("build_host") or {}
    gpu = host.get("gpu") or {}
    kernels = manifest.get("kernels") or {}
    need = {"ember_version": manifest.get("ember_version"), "precision": manifest.get("precision"),
            "torch_version": manifest.get("torch_version"), "device": manifest.get("device")}
    missing = [k for k, v in need.items() if not v]
    if manifest.get("device") == "cuda":
        need.update(gpu=gpu.get("name"), capability=gpu.get("capability"), cuda=gpu.get("cuda"))
        missing += [f"build_host.gpu.{k}" for k in ("name", "capability", "cuda") if not gpu.get(k)]
    if missing:
        raise SystemExit(f"engine manifest lacks {', '.join(missing)}: cannot name the artifact after it")
    out = {"ember": need["ember_version"], "precision": need["precision"],
           "torch": re.match(r"[0-9.]+", need["torch_version"]).group(0).rstrip("."),
           "triton": kernels.get("triton") or "none", "device": need["device"]}
    if need["device"] == "cuda":
        out.update(gpu=need["gpu"], capability=need["capability"], cuda=need["cuda"])
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def artifact_name(model: str, f: dict[str, str]) -> str:
    where = (f"{slug(f['gpu'])}-sm{f['capability'].replace('.', '')}" if f["device"] == "cuda" else "cpu")
    parts = [slug(model), f"ember{f['ember']}", where, slug(f["precision"]), f"torch{f['torch']}"]
    if f["device"] == "cuda":
        parts += [f"triton{f['triton']}", f"cuda{f['cuda']}"]
    name = "-".join(parts)
    if len(name) > 128:  # the longest OCI tag
        raise SystemExit(f"artifact name '{name}' is over 128 characters; shorten the model name")
    return name


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine")
    ap.add_argument("--model", required=True, help="model name (the model repository's folder name)")
    ap.add_argument("--json", action="store_true", help="print the fields and the name as JSON")
    ap.add_argument("--github-output", action="store_true", help="append name=... and the fields to $GITHUB_OUTPUT")
    args = ap.parse_args(argv)
    from ember.runtime.format import read_manifest

    f = fields(read_manifest(args.engine))
    name = artifact_name(args.model, f)
    print(json.dumps({"name": name, **f}) if args.json else name)
    if args.github_output:
        with open(os.environ["GITHUB_OUTPUT"], "a") as out:
            for k, v in {"name": name, **f}.items():
                out.write(f"{k}={v}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
