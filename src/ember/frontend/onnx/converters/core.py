"""Constant: becomes an IR constant (no node)."""
from __future__ import annotations

import numpy as np

from ..registry import converter


@converter("Constant")
def constant(b) -> None:
    a = b.attrs()
    if "value" in a:
        data = a["value"]
    elif "sparse_value" in a:
        data = a["sparse_value"]
    elif "value_float" in a:
        data = np.asarray(a["value_float"], dtype=np.float32)
    elif "value_floats" in a:
        data = np.asarray(a["value_floats"], dtype=np.float32)
    elif "value_int" in a:
        data = np.asarray(a["value_int"], dtype=np.int64)
    elif "value_ints" in a:
        data = np.asarray(a["value_ints"], dtype=np.int64)
    else:
        b.unsupported("Constant without a numeric value (strings are not run by ember)")
        return
    b.alias_output(0, b.const(data, hint="value"))
