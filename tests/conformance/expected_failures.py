"""ONNX node test cases ember is known to fail, grouped by family, each with the reason.

Patterns are fnmatch patterns over the case name (test_...). A case listed here that starts
passing makes the suite fail (strict xfail): remove it from the list.
"""
from __future__ import annotations

EXPECTED_FAILURES: dict[str, str] = {
}
