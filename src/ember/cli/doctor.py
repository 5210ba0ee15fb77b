"""`ember doctor [ENGINE ...] [--json]`: what this machine is, and whether each engine will run on it.

The environment comes from :mod:`ember.tools.environment`; each engine's verdict from the pure
checks of :mod:`ember.runtime.compat` over its manifest, then (unless ``--fast``) from reading the
whole file as a load would (checksums, graph, weights). Exit code 0 only if every engine given will
run here; with no engine, 0 unless the environment itself has an error.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Optional

import click
from rich.console import Console

from ..runtime.compat import ERROR, WARNING, Problem, check_engine, check_host, errors, will_run
from ..tools.raw_manifest import DIGEST, MAX_MANIFEST_BYTES, read_raw_manifest

REPORT_VERSION = 1


@click.command("doctor")
@click.argument("engines", nargs=-1, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the report.")
@click.option("--device", default=None, metavar="cuda:N",
              help="Check the engines against this GPU [default: the first, where Engine.load puts them; "
                   "another GPU that fits is named].")
@click.option("--allow-other-gpu", is_flag=True,
              help="Another GPU model is a warning, as with Engine.load(..., allow_other_gpu=True).")
@click.option("--verify-key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Check signatures with this key, as `ember serve --verify-key` would "
                   "[default: $EMBER_VERIFY_KEY_FILE].")
@click.option("--fast", is_flag=True, help="Check the manifests only; do not read and checksum every member.")
@click.option("--skip-triton-check", is_flag=True, help="Do not compile the test Triton kernel (GPU machines).")
@click.option("--triton-timeout", type=float, default=120.0, show_default=True, metavar="S",
              help="Seconds the Triton compiler check may take.")
def doctor_cmd(engines: tuple[str, ...], as_json: bool, device: Optional[str], allow_other_gpu: bool,
               verify_key: Optional[str], fast: bool, skip_triton_check: bool, triton_timeout: float) -> int:
    """Report the environment (versions, CUDA driver and runtime, GPUs, cuDNN/cuBLAS, the Triton
    compiler, caches) and say whether each ENGINE (a file, or a folder searched for *.engine) will
    load and run here, and if not, why and what to do."""
    from ..tools.environment import probe_host

    gpu_index = _gpu_index(device)
    paths = _engine_paths(engines)
    key = _verify_key(verify_key) if paths else None
    host = probe_host(triton_check=not skip_triton_check, triton_timeout_s=triton_timeout)
    host["verify_key"] = key is not None
    host_problems = check_host(host)
    reports = [diagnose_engine(p, host, gpu_index=gpu_index, allow_other_gpu=allow_other_gpu, fast=fast,
                               verify_key=key) for p in paths]
    ok = all(r["will_run"] for r in reports) if reports else will_run(host_problems)
    if as_json:
        doc = {"ember_doctor": REPORT_VERSION, "ok": ok, "host": host,
               "host_problems": [p.to_json() for p in host_problems], "engines": reports}
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        _print_report(host, host_problems, reports)
    return 0 if ok else 1


def _gpu_index(device: Optional[str]) -> Optional[int]:
    if device is None:
        return None
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise click.BadParameter(f"'{device}': write cuda or cuda:N", param_hint="--device")
    return int(index or 0)


def _verify_key(path: Optional[str]) -> Optional[bytes]:
    """The key from --verify-key, else from $EMBER_VERIFY_KEY_FILE (as the server reads it), else None."""
    if path is None and not os.environ.get("EMBER_VERIFY_KEY_FILE", "").strip():
        return None
    from ..runtime import signing

    return signing.load_key(path) if path is not None else signing.key_from_env()


def _engine_paths(args: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for a in args:
        if os.path.isdir(a):
            found = sorted(str(p) for p in Path(a).rglob("*.engine") if p.is_file())
            if not found:
                raise click.BadParameter(f"no *.engine file under folder '{a}'", param_hint="ENGINE")
            out += found
        else:
            out.append(a)
    return out


# -- one engine -------------------------------------------------------------------------------------

def diagnose_engine(path: str, host: dict[str, Any], *, gpu_index: Optional[int] = None,
                    allow_other_gpu: bool = False, fast: bool = False,
                    verify_key: Optional[bytes] = None) -> dict[str, Any]:
    """{"path", "will_run", "device", "built", "problems"} for one engine file on ``host``
    (``host["verify_key"]``: whether a key to check signatures was given)."""
    manifest, members, unreadable = read_raw_manifest(path)
    if unreadable:
        problems = [Problem("unreadable", ERROR, unreadable, "rebuild it with `ember build`, or copy it again")]
        return _report(path, None, problems, None)
    source = (manifest.get("source") or {}).get("file") if isinstance(manifest.get("source"), dict) else None
    kw = dict(members=members, signed=_signed(path, members), allow_other_gpu=allow_other_gpu,
              source=source or "MODEL.onnx", engine=path)
    problems = check_engine(manifest, host, gpu_index=gpu_index, **kw)
    device = None
    if will_run(problems):
        device = _device_of(host, gpu_index)
    elif gpu_index is None and manifest.get("device") == "cuda":
        # the first GPU does not fit: name another one of this machine that does
        for g in (host.get("gpus") or [])[1:]:
            other = check_engine(manifest, host, gpu_index=g.get("index"), **kw)
            if will_run(other):
                first = ", ".join(p.reason for p in errors(problems))
                problems = other + [Problem(
                    "other_gpu", WARNING, f"it does not fit cuda:0 ({first}); it fits cuda:{g['index']}",
                    f"load it there: Engine.load(path, device='cuda:{g['index']}'), or set "
                    f"CUDA_VISIBLE_DEVICES={g.get('uuid') or g['index']}")]
                device = f"cuda:{g['index']}"
                break
    if will_run(problems) and not fast:
        problems += _integrity_problems(path, verify_key)
        if not will_run(problems):
            device = None
    return _report(path, manifest, problems, device)


def _signed(path: str, members: list[str]) -> Optional[bool]:
    """Whether digest.json carries a signature (None: the file has no digest, or it is unreadable)."""
    if DIGEST not in members:
        return None
    try:
        with zipfile.ZipFile(path) as z:
            if z.getinfo(DIGEST).file_size > MAX_MANIFEST_BYTES:
                return None
            digest = json.loads(z.read(DIGEST))
    except Exception:  # a damaged digest shows in the integrity check, with the reader's message
        return None
    return isinstance(digest, dict) and digest.get("signature") is not None


def _integrity_problems(path: str, verify_key: Optional[bytes]) -> list[Problem]:
    """Read the engine as Engine.load does (digest, signature, checksums, graph, weights), on no device."""
    from ..errors import EmberError
    from ..runtime.format import read_engine

    try:
        if verify_key is not None:
            read_engine(path, verify_key=verify_key, require_key_if_signed=True)
        else:
            read_engine(path)
    except EmberError as e:
        code = "signature" if "signature" in type(e).__name__.lower() else "damaged"
        return [Problem(code, ERROR, str(e), "copy the engine again from where it was built, or rebuild it")]
    except Exception as e:  # a reader bug must not hide the verdict: report it as the reason
        return [Problem("damaged", ERROR, f"reading it failed: {type(e).__name__}: {e}",
                        "rebuild it; if it persists, report this message")]
    return []


def _device_of(host: dict[str, Any], gpu_index: Optional[int]) -> str:
    """Where Engine.load(path) would run a runnable engine: the GPU when torch can use one, else the CPU."""
    gpus = host.get("gpus") or []
    if gpus and not (host.get("cuda") or {}).get("unavailable"):
        return f"cuda:{gpu_index if gpu_index is not None else gpus[0].get('index', 0)}"
    return "cpu"


def _report(path: str, manifest: Optional[dict[str, Any]], problems: list[Problem],
            device: Optional[str]) -> dict[str, Any]:
    m = manifest or {}
    host = m.get("build_host") if isinstance(m.get("build_host"), dict) else {}
    gpu = host.get("gpu") if isinstance(host.get("gpu"), dict) else {}
    kernels = m.get("kernels") if isinstance(m.get("kernels"), dict) else {}
    built = {"ember": m.get("ember_version"), "torch": m.get("torch_version"), "triton": kernels.get("triton"),
             "onnx": m.get("onnx_version"), "format_version": m.get("format_version"), "device": m.get("device"),
             "gpu": gpu.get("name"), "capability": gpu.get("capability"), "cuda": gpu.get("cuda"),
             "precision": m.get("precision"), "created": m.get("created")}
    ok = will_run(problems)
    return {"path": path, "will_run": ok, "device": device if ok else None,
            "built": {k: v for k, v in built.items() if v is not None},
            "problems": [p.to_json() for p in problems]}


# -- the human report -------------------------------------------------------------------------------

def _print_report(host: dict[str, Any], host_problems: list[Problem], reports: list[dict[str, Any]]) -> None:
    out = Console(highlight=False, soft_wrap=True)

    def row(label: str, text: str) -> None:
        out.print(f"  {label:<14}{text}", markup=False)

    o, pk, cuda = host["os"], host["packages"], host["cuda"]
    out.print("[bold]Environment[/]")
    row("system", f"{o['system']} {o['release']} {o['machine']}"
        + (f" ({o['distribution']})" if o.get("distribution") else "") + f", {o['cpus']} CPUs")
    row("python", f"{host['python']['version']} ({host['python']['executable']})")
    row("packages", " · ".join(f"{k} {v}" for k, v in pk.items() if v) +
        (" · not installed: " + ", ".join(k for k, v in pk.items() if not v) if not all(pk.values()) else ""))
    row("CUDA", f"runtime {cuda.get('runtime') or '—'} (torch) · driver {cuda.get('driver') or '—'}"
        + (f" (supports CUDA {cuda['driver_cuda']})" if cuda.get("driver_cuda") else ""))
    if cuda.get("unavailable"):
        row("", f"no GPU for ember: {cuda['unavailable']}")
    libs = host["libraries"]
    row("cuDNN", _lib(libs["cudnn"]))
    row("cuBLAS", _lib(libs["cublas"]))
    nv = host["nvml"]
    row("NVML", "yes" if nv.get("available") else f"no: {nv.get('reason')}")
    gpus = host.get("gpus") or []
    if not gpus:
        row("GPUs", "none")
    for g in gpus:
        clocks = g.get("clocks_mhz") or {}
        mem = g.get("memory_total_bytes")
        used = g.get("memory_used_bytes")
        text = (f"cuda:{g['index']}  {g.get('name')}  sm {g.get('capability')}"
                + (f"  {mem / 2**30:.1f} GiB" if mem else "")
                + (f" ({used / 2**30:.1f} GiB used)" if used is not None else "")
                + (f"  SM {clocks.get('sm')}/{clocks.get('sm_max')} MHz" if clocks.get("sm_max") else "")
                + (f"  memory {clocks.get('memory_max')} MHz" if clocks.get("memory_max") else "")
                + (f"  {g['power_limit_w']:.0f} W" if g.get("power_limit_w") else ""))
        row("GPU", text)
    tc = host["triton_compile"]
    row("Triton", "compiler works" + (f" ({tc.get('seconds')} s for a test kernel)" if tc.get("seconds") else "")
        if tc.get("ok") else (f"compiler FAILED: {tc.get('error')}" if tc.get("ran") else tc.get("reason", "")))
    row("C compiler", f"{host.get('c_compiler') or 'none on PATH'} · Python headers "
        f"{'yes' if host.get('python_headers') else 'no'}")
    out.print("[bold]Caches[/]")
    labels = {"timing_cache": "timing", "triton_cache": "Triton", "ember_kernel_cache": "kernels",
              "serve_cache": "serve"}
    for name, c in host["caches"].items():
        state = ("exists" if c["exists"] else "not created yet") + ("" if c["writable"] else ", NOT writable")
        assumed = "  [path assumed]" if c.get("assumed") else ""
        row(labels.get(name, name), f"{c['path']}  ({state}; {c['what']}){assumed}")
    for p in host_problems:
        _print_problem(out, p)
    if reports:
        out.print("[bold]Engines[/]")
    for r in reports:
        b = r["built"]
        built = ", ".join(x for x in (
            f"{b['gpu']} sm {b.get('capability')}" if b.get("gpu") else b.get("device"), b.get("precision"),
            f"ember {b['ember']}" if b.get("ember") else None, f"torch {b['torch']}" if b.get("torch") else None,
            f"triton {b['triton']}" if b.get("triton") else None) if x)
        if r["will_run"]:
            out.print(f"  [green]✓ runs here[/] on {r['device']}: ", end="")
        else:
            out.print("  [red]✗ will not run here[/]: ", end="")
        out.print(r["path"] + (f"  (built: {built})" if built else ""), markup=False)
        for p in r["problems"]:
            _print_problem(out, Problem(**p), indent="      ")


def _print_problem(out: Console, p: Problem, indent: str = "  ") -> None:
    style = "red" if p.severity == ERROR else "yellow"
    out.print(f"{indent}[{style}]{p.severity}[/] ", end="")
    out.print(f"{p.reason}", markup=False)
    out.print(f"{indent}  → {p.remedy}", markup=False)


def _lib(info: dict[str, Any]) -> str:
    return f"{info['version']} ({info.get('source')})" if info.get("version") else f"— ({info.get('reason')})"
