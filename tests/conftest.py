"""Shared test configuration: CUDA tests skip without a GPU; every engine the suite builds round-trips
through its file (tests/roundtrip.py); the conformance and round-trip tallies are printed."""
from __future__ import annotations

import pytest

from tests import roundtrip


@pytest.fixture(autouse=True, scope="session")
def engines_round_trip():
    """Every engine built by ember.build / ember.builder.build is saved, loaded and run again on each of
    its runs, and must give identical outputs (tests/roundtrip.py)."""
    roundtrip.install()
    yield roundtrip.STATS
    roundtrip.cleanup()


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
    rt = roundtrip.STATS
    if rt["engines"] or rt["exempt"]:
        terminalreporter.write_line(
            f"Round trip: {rt['engines']} engines saved, loaded and run again; {rt['runs']} runs gave identical "
            f"outputs; {rt['exempt']} runs exempt (random ops: {', '.join(sorted(roundtrip.NONDETERMINISTIC_OPS))})")
    total = passed + failed + xfailed
    if total:
        terminalreporter.write_line(
            f"ONNX node conformance: {passed}/{total} cases pass on CPU ({100.0 * passed / total:.1f}%), "
            f"{xfailed} expected failures, {failed} unexpected failures")
