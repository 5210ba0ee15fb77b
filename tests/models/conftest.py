"""Session-wide model zoo: each (model, exporter, opset) is exported once, lazily, into one tmp dir."""
from __future__ import annotations

import pytest

from .zoo import Zoo

_zoos: list[Zoo] = []


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    instance = Zoo(tmp_path_factory.mktemp("models"))
    _zoos.append(instance)
    return instance


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line of export times, to keep an eye on this directory's share of the CI budget."""
    for z in _zoos:
        exports = z.exported()
        if exports:
            total = sum(e.export_seconds for e in exports) + sum(z.build_seconds.values())
            times = ", ".join(f"{e.id} {e.export_seconds:.1f}s" for e in exports)
            builds = ", ".join(f"{name} {s:.1f}s" for name, s in z.build_seconds.items())
            terminalreporter.write_line(f"model zoo: {total:.1f}s building and exporting; "
                                        f"torch models: {builds}; exports: {times}")
