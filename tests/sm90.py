"""Ahead-of-time compile checks for sm_90 (Hopper) on a machine without a GPU.

A test module defines ``_aot_main()`` that compiles its kernels for sm_90 and prints ``AOT-OK`` or
``AOT-FAILED`` with the failures; the check runs it in a fresh interpreter, because the suite's
other tests set ``TRITON_INTERPRET=1`` and Triton reads that once per process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def assert_aot_main_compiles(module: str) -> None:
    nvidia = pytest.importorskip("triton.backends.nvidia")
    if not (Path(nvidia.__file__).parent / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", f"from {module} import _aot_main; _aot_main()"],
                       env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert "AOT-OK" in r.stdout, r.stdout + r.stderr[-3000:]
