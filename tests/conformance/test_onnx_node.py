"""The ONNX node conformance suite, run through ember's reference runtime on CPU."""
from __future__ import annotations

import fnmatch

import pytest

from .expected_failures import EXPECTED_FAILURES
from .runner import collect, run_case

CASES = collect()


def _reason(name: str) -> "str | None":
    for pat, why in EXPECTED_FAILURES.items():
        if fnmatch.fnmatchcase(name, pat):
            return why
    return None


def _params():
    for c in CASES:
        why = _reason(c.name)
        marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
        yield pytest.param(c, id=c.name, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_node(case):
    run_case(case)
