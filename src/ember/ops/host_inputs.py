"""Inputs that are shape parameters, not data (TensorRT calls them shape tensors).

A reference function reads these with ``.tolist()``; the runtime keeps them on the host so that
reading them costs no device sync and a run can be captured in a CUDA graph. Keyed by op, then
by input parameter name (as in the reference function's signature).
"""
from __future__ import annotations

REDUCTIONS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

HOST_INPUTS: dict[str, tuple[str, ...]] = {
    "Reshape": ("shape",), "Expand": ("shape",), "Tile": ("repeats",), "ConstantOfShape": ("input",),
    "Slice": ("starts", "ends", "axes", "steps"), "Pad": ("pads", "axes"), "Resize": ("roi", "scales", "sizes"),
    "TopK": ("K",), "Unsqueeze": ("axes",), "Squeeze": ("axes",), "Split": ("split",), "OneHot": ("depth",),
    "CumSum": ("axis",), "CumProd": ("axis",), "Trilu": ("k",), "CenterCropPad": ("shape",),
    "DFT": ("dft_length", "axis"), "Range": ("start", "limit", "delta"),
    "AffineGrid": ("size",), "MaxUnpool": ("output_shape",), "Col2Im": ("image_shape", "block_shape"),
    "SequenceAt": ("position",), "SequenceInsert": ("position",), "SequenceErase": ("position",),
    **{r: ("axes",) for r in REDUCTIONS},
}


def host_input_positions(op: str, input_names: list[str]) -> frozenset[int]:
    names = HOST_INPUTS.get(op, ())
    return frozenset(i for i, n in enumerate(input_names) if n in names)
