"""Shared test configuration: CUDA tests skip without a GPU; the conformance tally is printed."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run with -m cuda on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = terminalreporter.stats
    passed = failed = xfailed = 0
    for key, count_as in (("passed", "p"), ("failed", "f"), ("xfailed", "x"), ("xpassed", "f")):
        for rep in stats.get(key, []):
            if "test_onnx_node" not in rep.nodeid or rep.when != "call" and key != "xfailed":
                continue
            if count_as == "p":
                passed += 1
            elif count_as == "x":
                xfailed += 1
            else:
                failed += 1
    total = passed + failed + xfailed
    if total:
        terminalreporter.write_line(
            f"ONNX node conformance: {passed}/{total} cases pass on CPU ({100.0 * passed / total:.1f}%), "
            f"{xfailed} expected failures, {failed} unexpected failures")
