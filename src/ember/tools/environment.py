"""What this machine is, for ``ember doctor``: versions, CUDA driver and runtime, GPUs, vendor
libraries, the Triton compiler and the caches. The result is the host description that
:mod:`ember.runtime.compat` checks engines against; every probe is best effort and says why it
found nothing, so the report works the same on a CPU-only machine.

GPUs come from NVML (package ``nvidia-ml-py``, module ``pynvml``) when it is installed and
initializes: name, compute capability, memory, clocks, power limit. Without it, from torch.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any, Optional

PACKAGES = ("ember", "torch", "triton", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "safetensors",
            "nvidia-ml-py")
TRITON_CHECK_TIMEOUT_S = 120.0


def probe_host(*, triton_check: bool = True, triton_timeout_s: float = TRITON_CHECK_TIMEOUT_S) -> dict[str, Any]:
    """The host description (keys documented in :mod:`ember.runtime.compat`) plus what the report shows."""
    import torch

    from ..runtime import format as engine_format

    versions = {name: _dist_version(name) for name in PACKAGES}
    host: dict[str, Any] = {
        "os": _os_info(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "packages": versions,
        "ember": _ember_version(), "torch": torch.__version__, "triton": _triton_version(),
        "onnx": versions["onnx"],
        "engine_format": engine_format.FORMAT_VERSION,
        "engine_format_oldest": getattr(engine_format, "MIN_FORMAT_VERSION", engine_format.FORMAT_VERSION),
        "backends": ["reference"],
    }
    nvml = _nvml_info()
    host["nvml"] = {k: v for k, v in nvml.items() if k != "gpus"}
    host["cuda"] = _cuda_info(torch, nvml)
    host["gpus"] = _gpus(torch, nvml, host["cuda"])
    host["libraries"] = {"cudnn": _cudnn_version(torch), "cublas": _cublas_version(torch)}
    host["c_compiler"] = _c_compiler()
    host["python_headers"] = os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    host["triton_compile"] = (_triton_compile_check(host, triton_timeout_s) if triton_check
                              else {"ran": False, "ok": None, "reason": "skipped (--skip-triton-check)"})
    host["caches"] = cache_locations()
    return host


# -- versions ---------------------------------------------------------------------------------------

def _dist_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _ember_version() -> str:
    from .. import __version__

    return __version__


def _triton_version() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
    except Exception:  # a broken install reports as absent, with its version from the metadata
        return None
    return triton.__version__


def _os_info() -> dict[str, Any]:
    pretty = None
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    pretty = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
            "distribution": pretty, "platform": platform.platform(), "cpus": os.cpu_count()}


# -- CUDA: driver, runtime, GPUs ----------------------------------------------------------------------

def _nvml_info() -> dict[str, Any]:
    """Driver and GPUs from NVML, or {"available": False, "reason": ...}."""
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound on machines without the NVIDIA driver
        return {"available": False, "reason": f"NVML did not initialize: {_text(e) or type(e).__name__}"}
    try:
        out: dict[str, Any] = {"available": True, "driver": _text(_try(pynvml.nvmlSystemGetDriverVersion))}
        cuda = _try(pynvml.nvmlSystemGetCudaDriverVersion)
        out["driver_cuda"] = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) and cuda else None
        gpus = []
        for i in range(_try(pynvml.nvmlDeviceGetCount) or 0):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            cap = _try(pynvml.nvmlDeviceGetCudaComputeCapability, h)
            mem = _try(pynvml.nvmlDeviceGetMemoryInfo, h)
            power = _try(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
            sm, memclk = getattr(pynvml, "NVML_CLOCK_SM", 1), getattr(pynvml, "NVML_CLOCK_MEM", 2)
            gpus.append({
                "nvml_index": i, "name": _text(_try(pynvml.nvmlDeviceGetName, h)),
                "uuid": _text(_try(pynvml.nvmlDeviceGetUUID, h)),
                "capability": f"{cap[0]}.{cap[1]}" if isinstance(cap, tuple) and len(cap) == 2 else None,
                "memory_total_bytes": getattr(mem, "total", None), "memory_used_bytes": getattr(mem, "used", None),
                "clocks_mhz": {"sm": _try(pynvml.nvmlDeviceGetClockInfo, h, sm),
                               "sm_max": _try(pynvml.nvmlDeviceGetMaxClockInfo, h, sm),
                               "memory": _try(pynvml.nvmlDeviceGetClockInfo, h, memclk),
                               "memory_max": _try(pynvml.nvmlDeviceGetMaxClockInfo, h, memclk)},
                "power_limit_w": power / 1000 if isinstance(power, (int, float)) else None,
            })
        out["gpus"] = gpus
        return out
    finally:
        _try(pynvml.nvmlShutdown)


def _cuda_info(torch: Any, nvml: dict[str, Any]) -> dict[str, Any]:
    runtime = torch.version.cuda
    driver, driver_cuda = nvml.get("driver"), nvml.get("driver_cuda")
    if driver is None:
        driver = _proc_driver_version()
    if driver_cuda is None:
        driver_cuda = _libcuda_driver_version()
    info: dict[str, Any] = {"runtime": runtime, "driver": driver, "driver_cuda": driver_cuda}
    if runtime is None:
        info["unavailable"] = f"torch {torch.__version__} is a CPU-only build"
    elif not torch.cuda.is_available():
        if driver is None and driver_cuda is None:
            info["unavailable"] = "no NVIDIA driver found (libcuda.so.1 does not load)"
        elif driver_cuda and _older(driver_cuda, runtime):
            info["unavailable"] = (f"the NVIDIA driver {driver or ''} supports CUDA {driver_cuda}; torch "
                                   f"{torch.__version__} needs CUDA {runtime}")
        elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            info["unavailable"] = f"no GPU visible with CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
        else:
            info["unavailable"] = "torch.cuda.is_available() is False"
    return info


def _gpus(torch: Any, nvml: dict[str, Any], cuda: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per GPU torch can use (its index is torch's), with NVML's details matched by UUID;
    NVML's list alone when torch cannot use the GPUs (the report still shows them)."""
    by_uuid = {str(g.get("uuid") or "").removeprefix("GPU-"): g for g in nvml.get("gpus", [])}
    if cuda.get("unavailable"):
        return [{"index": g["nvml_index"], **{k: v for k, v in g.items() if k != "nvml_index"}, "source": "nvml"}
                for g in nvml.get("gpus", [])]
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        g: dict[str, Any] = {"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                             "memory_total_bytes": int(p.total_memory), "multiprocessors": p.multi_processor_count,
                             "source": "torch"}
        extra = by_uuid.get(str(getattr(p, "uuid", "")))
        if extra is None and len(nvml.get("gpus", [])) == torch.cuda.device_count():
            extra = nvml["gpus"][i]
        if extra is not None:
            g.update({k: v for k, v in extra.items() if k in ("uuid", "memory_used_bytes", "clocks_mhz",
                                                             "power_limit_w", "nvml_index")})
            g["source"] = "torch+nvml"
        out.append(g)
    return out


def _proc_driver_version() -> Optional[str]:
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return None
    parts = [w for w in first.split() if w[:1].isdigit() and w.count(".") >= 1]
    return parts[0] if parts else None


def _libcuda_driver_version() -> Optional[str]:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0 or not v.value:  # needs no cuInit
        return None
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


# -- vendor libraries -------------------------------------------------------------------------------

def _cudnn_version(torch: Any) -> dict[str, Any]:
    try:
        v = torch.backends.cudnn.version() if torch.version.cuda else None
    except Exception as e:  # cuDNN present but not loadable
        return {"version": None, "reason": f"cuDNN did not load: {e}"}
    if not v:
        return {"version": None, "reason": "torch is a CPU-only build" if not torch.version.cuda
                else "torch was built without cuDNN"}
    major, rest = (v // 10000, v % 10000) if v >= 90000 else (v // 1000, v % 1000)
    return {"version": f"{major}.{rest // 100}.{rest % 100}", "source": "torch.backends.cudnn"}


def _cublas_version(torch: Any) -> dict[str, Any]:
    for dist in ("nvidia-cublas", "nvidia-cublas-cu13", "nvidia-cublas-cu12", "nvidia-cublas-cu11"):
        v = _dist_version(dist)
        if v:
            return {"version": v, "source": f"pip package {dist}"}
    if not torch.version.cuda:
        return {"version": None, "reason": "torch is a CPU-only build"}
    v = _cublas_from_library()
    return {"version": v, "source": "libcublas"} if v else {"version": None, "reason": "libcublas not found"}


def _cublas_from_library() -> Optional[str]:
    """cublasGetProperty on the libcublas that torch would load (needs no GPU and no handle)."""
    import ctypes.util

    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(glob.glob(os.path.join(root, "cublas", "lib", "libcublas.so*")))
    found = ctypes.util.find_library("cublas")
    if found:
        candidates.append(found)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            parts = []
            for prop in (0, 1, 2):  # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
                v = ctypes.c_int(0)
                if lib.cublasGetProperty(prop, ctypes.byref(v)) != 0:
                    break
                parts.append(str(v.value))
            if len(parts) == 3:
                return ".".join(parts)
        except (OSError, AttributeError):
            continue
    return None


# -- Triton and the C compiler ----------------------------------------------------------------------

def _c_compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")


_TRITON_TEST = '''
import json, time
import torch, triton, triton.language as tl

@triton.jit
def add_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

t0 = time.perf_counter()
x = torch.arange(100, device="cuda", dtype=torch.float32)
out = torch.empty_like(x)
add_one[(1,)](x, out, 100, BLOCK=128)
torch.cuda.synchronize()
print(json.dumps({"ok": bool(torch.equal(out, x + 1)), "seconds": round(time.perf_counter() - t0, 2)}))
'''


def _triton_compile_check(host: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Compile and run one tiny kernel in a child process, with an empty Triton cache (so the
    compiler and the C compiler really run), bounded by ``timeout_s``."""
    if not host.get("triton"):
        return {"ran": False, "ok": None, "reason": "triton is not installed"}
    if host["cuda"].get("unavailable") or not host.get("gpus"):
        why = host["cuda"].get("unavailable") or "no CUDA GPU"
        return {"ran": False, "ok": None,
                "reason": f"not run: {why}. Triton compiles for GPUs; on the CPU ember runs its reference "
                          "kernels (TRITON_INTERPRET=1 interprets Triton kernels, for tests)"}
    with tempfile.TemporaryDirectory(prefix="ember-doctor-") as tmp:
        script = os.path.join(tmp, "triton_check.py")
        with open(script, "w") as f:
            f.write(_TRITON_TEST)
        env = {**os.environ, "TRITON_CACHE_DIR": os.path.join(tmp, "cache")}
        env.pop("TRITON_INTERPRET", None)
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=timeout_s,
                               env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"ran": True, "ok": False, "error": f"no result within {timeout_s:.0f} s"}
        seconds = round(time.perf_counter() - t0, 2)
        if r.returncode == 0:
            try:
                res = json.loads(r.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                res = {"ok": False}
            if res.get("ok"):
                return {"ran": True, "ok": True, "seconds": seconds}
            return {"ran": True, "ok": False, "error": "the test kernel ran and returned wrong values"}
        tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        return {"ran": True, "ok": False, "error": tail[-1][:500] if tail else f"exit code {r.returncode}"}


# -- caches -----------------------------------------------------------------------------------------

def cache_locations() -> dict[str, dict[str, Any]]:
    """Where ember and Triton keep what they compute once: path, whether it exists and is writable."""
    from ..builder.tuner import default_cache_path

    xdg = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    kernel_dir, kernel_assumed = _ember_kernel_cache(xdg)
    out = {
        "timing_cache": _where(default_cache_path(), "ember's tactic timing cache (ember build)"),
        "triton_cache": _where(_triton_cache_dir(), "Triton's compiled-kernel cache ($TRITON_CACHE_DIR)"),
        "ember_kernel_cache": _where(kernel_dir, "compiled kernels restored from engine files"),
        # ember serve's default --cache-dir (engines built from model.onnx)
        "serve_cache": _where(os.path.join(os.path.expanduser("~"), ".cache", "ember", "serve"),
                              "engines that ember serve built from model.onnx (--cache-dir)"),
    }
    if kernel_assumed:
        out["ember_kernel_cache"]["assumed"] = True
    return out


def _ember_kernel_cache(xdg: str) -> tuple[str, bool]:
    """The folder kernels.kernel_store restores engine kernels into (``store_dir()``); an ember without
    it restores into Triton's cache, and the path it would use is reported as assumed."""
    from ..kernels import kernel_store

    for attr in ("store_dir", "cache_dir"):
        fn = getattr(kernel_store, attr, None)
        if callable(fn):
            try:
                return os.fspath(fn()), False
            except Exception:
                break
    return os.path.join(xdg, "ember", "triton"), True


def _triton_cache_dir() -> str:
    env = os.environ.get("TRITON_CACHE_DIR")
    if env:
        return env
    try:
        import triton

        knobs = getattr(triton, "knobs", None)
        d = getattr(getattr(knobs, "cache", None), "dir", None)
        if d:
            return os.fspath(d)
        from triton.runtime.cache import default_cache_dir

        return default_cache_dir()
    except Exception:  # no triton, or an older layout: its documented default
        return os.path.join(os.path.expanduser("~"), ".triton", "cache")


def _where(path: str, what: str) -> dict[str, Any]:
    exists = os.path.exists(path)
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)  # a folder not made yet is writable if its nearest parent is
    return {"path": path, "what": what, "exists": exists, "writable": os.access(probe, os.W_OK)}


# -- helpers ----------------------------------------------------------------------------------------

def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # one NVML query unsupported on this GPU or VM: that field is left out
        return None


def _text(v: Any) -> Optional[str]:
    if v is None:
        return None
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _older(a: str, b: str) -> bool:
    def rel(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())
    return rel(a) < rel(b)
