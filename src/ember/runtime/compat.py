"""Will this engine load and run here? Pure functions over an engine's manifest and a host description.

Nothing here probes the machine or opens a file: the caller describes the host (``ember doctor``
from NVML, torch and the installed packages; ``Engine.load`` from the one device it loads on) and
gets back a list of :class:`Problem`, each with the reason and what to do. ``Engine.load`` refuses an
engine with an ``error``; a ``warning`` runs, but not exactly as built (slower first requests,
tactics timed with other libraries).

The host description is a plain dict; every key is optional and an absent key is never a problem:

    {"ember": "0.1.0", "torch": "2.11.0+cu130", "triton": "3.6.0" | None, "onnx": "1.23.1",
     "engine_format": 2,                 # newest engine format version this ember reads
     "engine_format_oldest": 2,          # oldest one (default: the newest)
     "backends": ["reference"],          # engine backends this ember runs
     "cuda": {"runtime": "13.0",         # torch.version.cuda; None: a CPU build of torch
              "driver": "580.159.04", "driver_cuda": "13.0",
              "unavailable": "why torch sees no GPU, when it sees none"},
     "gpus": [{"index": 0, "name": "NVIDIA H200", "capability": "9.0", "memory_total_bytes": 150e9}],
     "c_compiler": "/usr/bin/gcc" | None, "python_headers": True,
     "verify_key": False}                # a key to verify engine signatures was given

The engine facts besides the manifest are the archive's member names (``members``), used to find
compiled kernels that the manifest lists but the file lost, and whether it carries a signature.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

from ..errors import EngineFileError

ERROR, WARNING = "error", "warning"
ENGINE_FORMAT_NAME = "ember-engine"
KERNEL_PREFIX = "kernels/"
# storage precisions and the first compute capability whose tensor cores and vendor kernels run them
MIN_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9)}


@dataclass(frozen=True)
class Problem:
    """One reason an engine will not run here (``error``) or will run differently (``warning``)."""

    code: str       # stable identifier: "gpu_model", "capability", "triton_version", ...
    severity: str   # ERROR or WARNING
    reason: str     # what differs, with both values
    remedy: str     # what to do about it

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: {self.reason} — {self.remedy}"


def host_for_gpu(name: Optional[str], capability: Optional[str], **versions: Any) -> dict[str, Any]:
    """The host description of one device, as ``Engine.load`` knows it (name and capability of the
    GPU it loads on, or None for the CPU), plus any version keys (``torch=...``, ``triton=...``)."""
    host: dict[str, Any] = dict(versions)
    host["gpus"] = [{"index": 0, "name": name, "capability": capability}] if name else []
    return host


def check_engine(manifest: Any, host: dict[str, Any], *, gpu_index: Optional[int] = None,
                 members: Optional[Iterable[str]] = None, signed: Optional[bool] = None,
                 allow_other_gpu: bool = False, source: str = "MODEL.onnx",
                 engine: str = "ENGINE") -> list[Problem]:
    """Every problem that keeps the engine with ``manifest`` from running on ``host`` as built.

    ``gpu_index``: the GPU it would load on (default: the first, as ``Engine.load(device="cuda")``).
    ``members``: the archive's member names, if known. ``signed``: whether the archive carries a
    signature, if known. ``allow_other_gpu``: another GPU model is a warning, as with
    ``Engine.load(..., allow_other_gpu=True)``. ``source``/``engine``: names used in remedies.
    """
    if not isinstance(manifest, dict):
        return [Problem("not_an_engine", ERROR, "the file has no manifest object",
                        "it is not an ember engine: build one with `ember build`")]
    m = _Manifest(manifest)
    src = m.str("source.file") or source
    rebuild = f"`ember build {src} --rebuild-from {engine} -o {engine}`"
    problems = _format_problems(m, host, rebuild)
    if any(p.severity == ERROR for p in problems):
        return problems  # the rest of an unreadable manifest means nothing
    gpus = [g for g in host.get("gpus") or [] if isinstance(g, dict)]
    gpu = None if _cuda(host).get("unavailable") else _pick_gpu(gpus, gpu_index)
    if m.str("device") == "cuda":
        if gpu is None:
            problems.append(_no_gpu(m, host, gpu_index, src, engine))
        else:
            problems += gpu_problems(manifest, gpu, allow_other_gpu=allow_other_gpu, rebuild=rebuild)
            problems += _kernel_problems(m, host, members)
            problems += _cuda_version_problems(m, host, rebuild)
    elif m.str("device") == "cpu" and gpus:
        problems.append(Problem(
            "untuned_for_gpu", WARNING, "the engine was built on the CPU: its tactics were not timed on "
            "any GPU, so on this GPU it runs the reference kernels",
            f"rebuild it on this GPU for speed: {rebuild}"))
    problems += _version_problems(m, host, rebuild)
    problems += _signature_problems(host, signed)
    return problems


def gpu_problems(manifest: dict[str, Any], gpu: dict[str, Any], *, allow_other_gpu: bool = False,
                 rebuild: str = "`ember build MODEL.onnx --rebuild-from ENGINE`") -> list[Problem]:
    """Problems between a CUDA engine and one GPU (``{"name", "capability", "memory_total_bytes"}``).

    Engine.load's GPU check is this function's ``gpu_model``/``capability`` errors: tactics are
    timed, and kernels compiled, for one GPU model.
    """
    m = _Manifest(manifest)
    if m.str("device") != "cuda":
        return []
    out: list[Problem] = []
    name, cap = gpu.get("name"), gpu.get("capability")
    severity = WARNING if allow_other_gpu else ERROR
    other = (" Engine.load(path, allow_other_gpu=True) runs it anyway, with the other GPU's tactics."
             if not allow_other_gpu else "")
    built = m.get("build_host.gpu")
    if built:  # an engine that records its GPU runs on that GPU model only (an engine that does not: anywhere)
        rec = built if isinstance(built, dict) else {}
        built_name = rec.get("name") if isinstance(rec.get("name"), str) else None
        built_cap = rec.get("capability") if isinstance(rec.get("capability"), str) else None
        if name is not None and built_name != name:
            out.append(Problem("gpu_model", severity,
                               f"built and tuned on {built_name}; this GPU is {name}" if built_name else
                               f"the manifest does not name the GPU it was tuned on (field build_host.gpu.name); "
                               f"this GPU is {name}", f"rebuild it here: {rebuild}.{other}"))
        if cap is not None and built_cap != cap:
            out.append(Problem("capability", severity,
                               f"built for compute capability {built_cap} (sm_{built_cap.replace('.', '')}); this "
                               f"GPU has {cap} (sm_{str(cap).replace('.', '')}): its compiled kernels and tactics "
                               "are for the other architecture" if built_cap else
                               "the manifest does not record the compute capability it was built for (field "
                               f"build_host.gpu.capability); this GPU has {cap}",
                               f"rebuild it here: {rebuild}.{other}"))
    precision = m.str("precision") or ""
    need = MIN_CAPABILITY.get(precision)
    have = _capability(cap)
    if need and have and have < need:
        out.append(Problem("precision", ERROR,
                           f"{precision} needs compute capability {need[0]}.{need[1]} or newer; this GPU has {cap}",
                           "rebuild it in fp16 (`ember build ... --fp16`), or run it on a newer GPU"))
    mem = manifest.get("memory") if isinstance(manifest.get("memory"), dict) else {}
    need_mib = sum(v for k in ("weights_mib", "activations_peak_mib")
                   if isinstance(v := mem.get(k), (int, float)) and not isinstance(v, bool))
    total = gpu.get("memory_total_bytes")
    if need_mib and isinstance(total, (int, float)) and need_mib * 2**20 > total:
        out.append(Problem("gpu_memory", ERROR,
                           f"weights and activations at the opt shapes need {need_mib:,.0f} MiB; this GPU has "
                           f"{total / 2**20:,.0f} MiB",
                           "rebuild with smaller --opt-shapes/--max-shapes or in fp16, or use a GPU with more memory"))
    return out


def errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == ERROR]


def will_run(problems: Iterable[Problem]) -> bool:
    return not errors(problems)


def require_runnable(problems: Iterable[Problem], path: str) -> None:
    """Raise EngineFileError naming every error of ``problems`` (for Engine.load)."""
    errs = errors(problems)
    if errs:
        lines = "\n".join(f"  - {p.reason}. {p.remedy}" for p in errs)
        raise EngineFileError(f"engine '{path}' will not run here:\n{lines}")


# -- the checks -------------------------------------------------------------------------------------

def _format_problems(m: "_Manifest", host: dict[str, Any], rebuild: str) -> list[Problem]:
    out: list[Problem] = []
    fmt, version = m.get("format"), m.get("format_version")
    if fmt != ENGINE_FORMAT_NAME:
        return [Problem("not_an_engine", ERROR, f"the manifest's format is {fmt!r}, not {ENGINE_FORMAT_NAME!r}",
                        "it is not an ember engine: build one with `ember build`")]
    readable = host.get("engine_format")
    oldest = host.get("engine_format_oldest", readable)
    if not isinstance(version, int) or isinstance(version, bool):
        out.append(Problem("format_version", ERROR, f"the manifest's format_version is {version!r}, not an integer",
                           f"the file is damaged: rebuild it with {rebuild}"))
    elif isinstance(oldest, int) and version < oldest:
        out.append(Problem(
            "format_version", ERROR,
            f"engine format version {version} (written by ember {m.str('ember_version') or '?'}); this ember "
            f"({host.get('ember', '?')}) reads version {oldest}" + (f" to {readable}" if readable != oldest else ""),
            f"rebuild it with this ember: {rebuild}"))
    elif isinstance(readable, int) and version > readable:
        built_by = m.str("ember_version")
        out.append(Problem(
            "format_version", ERROR,
            f"engine format version {version} (written by ember {built_by or '?'}); this ember "
            f"({host.get('ember', '?')}) reads version {readable} and older",
            (f"install ember=={built_by}, or " if built_by else "upgrade ember, or ") + f"rebuild it with {rebuild}"))
    backend = m.get("backend", "reference")
    backends = host.get("backends")
    if isinstance(backends, (list, tuple)) and backend not in backends:
        out.append(Problem("backend", ERROR,
                           f"the engine needs backend {backend!r}; this ember has {', '.join(map(str, backends))}",
                           f"rebuild it for this machine: {rebuild}"))
    return out


def _no_gpu(m: "_Manifest", host: dict[str, Any], gpu_index: Optional[int], src: str, engine: str) -> Problem:
    built = m.str("build_host.gpu.name")
    on = f" on {built} (sm {m.str('build_host.gpu.capability')})" if built else ""
    cuda = _cuda(host)
    if cuda.get("unavailable"):
        why = f"torch sees no CUDA GPU here: {cuda['unavailable']}"
    elif gpu_index is not None and host.get("gpus"):
        why = f"this machine has no GPU with index {gpu_index}"
    elif host.get("cuda") is not None and not cuda.get("runtime"):
        why = f"torch {host.get('torch', '')} is a CPU-only build"
    else:
        why = "torch sees no CUDA GPU here"
    return Problem("no_gpu", ERROR, f"the engine was built for CUDA{on}; {why}",
                   f"run it on a machine with that GPU, or rebuild it for the CPU: "
                   f"`ember build {src} --rebuild-from {engine} --device cpu -o {engine}`")


def _kernel_problems(m: "_Manifest", host: dict[str, Any], members: Optional[Iterable[str]]) -> list[Problem]:
    out: list[Problem] = []
    kernels = m.get("kernels")
    built_triton = kernels.get("triton") if isinstance(kernels, dict) else None
    count = kernels.get("count") if isinstance(kernels, dict) else None
    tactics = m.get("tactics") if isinstance(m.get("tactics"), dict) else {}
    generated = sum(n for t, n in tactics.items() if isinstance(t, str) and t.startswith("triton")
                    and isinstance(n, int))
    uses_triton = bool(built_triton) or generated > 0
    triton = host.get("triton")
    if uses_triton and "triton" in host and not triton:
        built = f" (built with triton {built_triton})" if built_triton else ""
        out.append(Problem("triton_missing", ERROR,
                           f"the engine runs generated Triton kernels{built}; triton is not installed here",
                           f"pip install triton=={built_triton}" if built_triton else "pip install triton"))
        return out
    if built_triton and triton and built_triton != triton:
        n = f"{count} " if isinstance(count, int) else ""
        out.append(Problem("triton_version", WARNING,
                           f"its {n}compiled kernels are for triton {built_triton}; this is triton {triton}: they "
                           "are compiled again on first use (slower first requests)",
                           f"pip install triton=={built_triton} to use them as built, or rebuild the engine here"))
    if members is not None:
        present = set(members)
        listed = set(m.member_names())
        lost = sorted(n for n in listed - present if n.startswith(KERNEL_PREFIX))
        if lost:
            out.append(Problem("kernels_missing", ERROR,
                               f"{len(lost)} compiled-kernel member(s) the manifest lists are not in the file "
                               f"(first: {lost[0]}): the file was cut or edited after it was built",
                               "copy the engine again from where it was built, or rebuild it"))
        elif isinstance(count, int) and count and not any(n.startswith(KERNEL_PREFIX) for n in present):
            out.append(Problem("kernels_missing", ERROR,
                               f"the manifest says {count} compiled kernels; the file holds none",
                               "copy the engine again from where it was built, or rebuild it"))
    if uses_triton and host.get("c_compiler", "") is None:
        out.append(Problem("c_compiler", ERROR,
                           "Triton builds its CUDA launcher with a C compiler on first use; none is on PATH "
                           "(gcc, cc, clang, or $CC)",
                           "install one: `apt-get install gcc python3-dev` (the ember image has it)"))
    elif uses_triton and host.get("python_headers") is False:
        out.append(Problem("c_compiler", ERROR,
                           "Triton builds its CUDA launcher against Python.h on first use; the Python headers "
                           "are not installed", "install them: `apt-get install python3-dev`"))
    return out


def _cuda_version_problems(m: "_Manifest", host: dict[str, Any], rebuild: str) -> list[Problem]:
    """A CUDA engine on a usable GPU: the libraries its tactics were timed with."""
    out: list[Problem] = []
    built_torch, torch = m.str("torch_version"), host.get("torch")
    if built_torch and torch and built_torch != torch:
        out.append(Problem("torch_version", WARNING,
                           f"its tactics were timed with torch {built_torch}; this is torch {torch}",
                           f"pip install torch=={_release_text(built_torch)} to run it as built, or rebuild it "
                           f"here: {rebuild}"))
    built_cuda, runtime = m.str("build_host.gpu.cuda"), _cuda(host).get("runtime")
    if built_cuda and runtime and _major(built_cuda) != _major(runtime):
        out.append(Problem("cuda_version", WARNING,
                           f"built with CUDA {built_cuda}; torch here uses CUDA {runtime}",
                           f"install the torch build for CUDA {built_cuda}, or rebuild it here: {rebuild}"))
    return out


def _version_problems(m: "_Manifest", host: dict[str, Any], rebuild: str) -> list[Problem]:
    out: list[Problem] = []
    built_ember, ember = m.str("ember_version"), host.get("ember")
    if built_ember and ember and _release(built_ember) > _release(ember):
        out.append(Problem("ember_version", WARNING,
                           f"built by ember {built_ember}, newer than this ember {ember}: ops or tactics added "
                           "since may be unknown here",
                           f"pip install ember=={built_ember}"))
    return out


def _signature_problems(host: dict[str, Any], signed: Optional[bool]) -> list[Problem]:
    if host.get("verify_key") and signed is False:
        return [Problem("signature_required", ERROR,
                        "a verification key is set, and the engine is not signed",
                        "rebuild it with `ember build ... --sign-key FILE` using the same key")]
    if signed and host.get("verify_key") is False:
        return [Problem("signature_required", ERROR,
                        "the engine is signed; loading it needs the key it was signed with",
                        "pass --verify-key FILE (or set EMBER_VERIFY_KEY_FILE)")]
    return []


def check_host(host: dict[str, Any]) -> list[Problem]:
    """Problems of the machine itself, whatever engine it runs: a driver older than torch's CUDA, a
    CPU build of torch beside NVIDIA GPUs, no C compiler for Triton, a Triton compiler that fails."""
    out: list[Problem] = []
    cuda, gpus = _cuda(host), host.get("gpus") or []
    runtime, driver_cuda = cuda.get("runtime"), cuda.get("driver_cuda")
    if runtime and driver_cuda and _release(driver_cuda) < _release(runtime)[:2]:
        out.append(Problem("cuda_driver", ERROR,
                           f"torch here uses CUDA {runtime}; the NVIDIA driver ({cuda.get('driver', '?')}) supports "
                           f"CUDA {driver_cuda} at most",
                           f"upgrade the NVIDIA driver to one for CUDA {runtime}, or install a torch build for "
                           f"CUDA {driver_cuda}"))
    if gpus and "runtime" in cuda and not runtime:
        out.append(Problem("torch_cpu_build", ERROR,
                           f"this machine has {len(gpus)} NVIDIA GPU(s), and torch {host.get('torch', '')} is a "
                           "CPU-only build", "install a CUDA build of torch (the versions in constraints.txt)"))
    if gpus and not cuda.get("unavailable") and host.get("c_compiler", "") is None:
        out.append(Problem("c_compiler", WARNING,
                           "no C compiler on PATH (gcc, cc, clang, or $CC): Triton needs one on first use to "
                           "build its CUDA launcher", "`apt-get install gcc python3-dev`"))
    compile_check = host.get("triton_compile")
    if isinstance(compile_check, dict) and compile_check.get("ok") is False and compile_check.get("ran"):
        out.append(Problem("triton_compile", ERROR,
                           f"Triton could not compile and run a test kernel: {compile_check.get('error', '?')}",
                           "engines with generated kernels will fail here; see the error, and the C compiler and "
                           "CUDA driver lines above"))
    return out


# -- helpers ----------------------------------------------------------------------------------------

class _Manifest:
    """Typed reads of a manifest that may be malformed: a field of the wrong type reads as absent."""

    def __init__(self, manifest: dict[str, Any]):
        self.m = manifest

    def get(self, dotted: str, default: Any = None) -> Any:
        v: Any = self.m
        for k in dotted.split("."):
            if not isinstance(v, dict) or k not in v:
                return default
            v = v[k]
        return v

    def str(self, dotted: str) -> Optional[str]:
        v = self.get(dotted)
        return v if isinstance(v, str) else None

    def member_names(self) -> list[str]:
        # format 1 lists checksums by member name; later formats list members with sha256 and size
        names: list[str] = []
        for key in ("checksums", "members"):
            v = self.m.get(key)
            if isinstance(v, dict):
                names += [k for k in v if isinstance(k, str)]
        return names


def _cuda(host: dict[str, Any]) -> dict[str, Any]:
    return host["cuda"] if isinstance(host.get("cuda"), dict) else {}


def _pick_gpu(gpus: list[dict[str, Any]], index: Optional[int]) -> Optional[dict[str, Any]]:
    if index is None:
        return gpus[0] if gpus else None
    return next((g for g in gpus if g.get("index") == index), None)


def _release(v: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); '13.0' -> (13, 0). Text without a leading number -> ()."""
    m = re.match(r"\d+(?:\.\d+)*", str(v).strip().lstrip("v"))
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def _release_text(v: str) -> str:
    return ".".join(map(str, _release(v))) or v


def _major(v: str) -> Optional[int]:
    r = _release(v)
    return r[0] if r else None


def _capability(v: Any) -> Optional[tuple[int, int]]:
    r = _release(str(v)) if v is not None else ()
    return (r[0], r[1]) if len(r) >= 2 else None


__all__ = ["ERROR", "WARNING", "Problem", "check_engine", "check_host", "errors", "gpu_problems", "host_for_gpu",
           "require_runnable", "will_run"]
