"""Converters for control flow: Scan-8 (batched, with sequence_lens) becomes a Loop over the batch of Scan-9+."""
from __future__ import annotations

from ....ir.graph import Graph, Value
from ..registry import converter


@converter("Scan", until=8)
def scan_v8(b) -> None:
    """Scan-8 runs its body per batch row (axis 0); scan inputs are scanned along axis 1.

    Rewritten as ``Loop(M=batch)`` whose body gathers row ``i`` of every state and scan input,
    runs a Scan-9 on it and emits the row's results as loop scan outputs (stacked on axis 0).
    """
    if b.input(0) is not None:
        b.unsupported("Scan-8 with sequence_lens is not supported; re-export with opset >= 9")
    operands = [b.input(i) for i in range(1, b.num_inputs)]
    n_scan = b.attr("num_scan_inputs")
    directions = b.attr("directions")
    body: Graph = b.attr("body")
    if not operands:
        b.unsupported("Scan without inputs")

    first = operands[0]
    if first.shape is not None and isinstance(first.shape[0], int):
        trip = b.const_i64(first.shape[0], hint="batch")
    else:
        shp = b.emit("Shape", [first], {"start": 0, "end": 1}, outputs=1).outputs[0]
        trip = b.emit("Squeeze", [shp, b.const_i64([0], hint="axis0")], outputs=1).outputs[0]

    loop_body = Graph(name=f"{b.name}.batch_loop")
    it = loop_body.add_input(b.tmp("i").name, None, ())
    cond = loop_body.add_input(b.tmp("cond").name, None, ())
    from ....ir.dtypes import DType

    it.dtype, cond.dtype = DType.INT64, DType.BOOL
    rows = []
    for v in operands:
        row = Value(b.tmp("row").name, v.dtype, v.shape[1:] if v.shape is not None else None)
        loop_body.add_node("Gather", [v, it], [row], {"axis": 0}, name=f"{b.name}/gather_row")
        rows.append(row)
    n_out = len(b.proto.output)
    row_outs = [Value(b.tmp("row_out").name) for _ in range(n_out)]
    attrs = {"body": body, "num_scan_inputs": n_scan}
    if directions is not None:
        attrs["scan_input_directions"] = directions
    loop_body.add_node("Scan", rows, row_outs, attrs, name=f"{b.name}/scan_row")
    loop_body.outputs = [cond, *row_outs]
    b.emit("Loop", [trip, None], {"body": loop_body})
