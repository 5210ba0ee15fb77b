"""Session-wide model zoo: each (model, exporter, opset) is exported once, lazily, into one tmp dir."""
from __future__ import annotations

import pytest

from . import zoo as zoo_module


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> zoo_module.Zoo:
    return zoo_module.Zoo(tmp_path_factory.mktemp("models"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line of build and export times (all test directories), to watch the zoo's share of the CI budget."""
    exports = zoo_module.Zoo.exported()
    if exports:
        builds = zoo_module.BUILD_SECONDS
        total = sum(e.export_seconds for e in exports) + sum(builds.values())
        times = ", ".join(f"{e.id} {e.export_seconds:.1f}s" for e in exports)
        models = ", ".join(f"{name} {s:.1f}s" for name, s in builds.items())
        terminalreporter.write_line(f"model zoo: {total:.1f}s building and exporting; "
                                    f"torch models: {models}; exports: {times}")
