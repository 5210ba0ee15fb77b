"""Neural-net layers across opsets: BatchNormalization, GroupNormalization, Upsample/Resize, GridSample.

IR semantics are the newest opset's; older spellings are rewritten here.
"""
from __future__ import annotations

import numpy as np

from ..registry import converter


@converter("BatchNormalization", until=13)
def batch_normalization_v1_13(b) -> None:
    """Old forms: consumed_inputs (<6), is_test (<7), spatial (<9); several outputs meant training."""
    if b.attr("spatial", 1) != 1:
        b.unsupported("BatchNormalization with spatial=0 (per-activation statistics) is not supported")
    named = [i for i, name in enumerate(b.proto.output) if name]
    if any(i >= 3 for i in named):
        b.unsupported("the saved_mean/saved_var outputs of a training BatchNormalization are not supported")
    attrs = {"epsilon": b.attr("epsilon", 1e-5)}
    outs = b.node_outputs()
    if len(named) > 1:  # running mean/var asked for: the training form
        attrs.update(momentum=b.attr("momentum", 0.9), training_mode=1)
        b.emit("BatchNormalization", b.inputs()[:5], attrs, outputs=outs[:3])
    else:
        b.emit("BatchNormalization", b.inputs()[:5], attrs, outputs=outs[:1])


@converter("GroupNormalization", since=18, until=20)
def group_normalization_v18(b) -> None:
    """Opset 18 scales and shifts per group; opset 21 per channel: repeat each group's value."""
    x, scale, bias = b.input(0), b.input(1), b.input(2)
    groups = b.attr("num_groups")
    channels = x.shape[1] if x.shape is not None and len(x.shape) > 1 else None
    if not isinstance(channels, int):
        b.unsupported("opset-18 GroupNormalization needs a static channel count to expand per-group scale")
    per_group = channels // groups
    args = []
    for v in (scale, bias):
        if v.is_const:
            args.append(b.const(np.repeat(np.asarray(v.data).reshape(-1), per_group), hint="per_channel"))
        else:
            col = b.emit("Reshape", [v, b.const_i64([groups, 1])], outputs=1).outputs[0]
            wide = b.emit("Expand", [col, b.const_i64([groups, per_group])], outputs=1).outputs[0]
            args.append(b.emit("Reshape", [wide, b.const_i64([channels])], outputs=1).outputs[0])
    attrs = {k: v for k, v in b.attrs().items() if k in ("epsilon", "num_groups")}
    b.emit("GroupNormalization", [x, *args], attrs)


def _legacy_resize(b, scales) -> None:
    """Upsample (7-9) and Resize-10: floor(in * scale) outputs, asymmetric coordinates.

    Their nearest mode (onnxruntime's "simple") floors on upsampled axes and ceils on downsampled
    ones, so with constant scales that mix both, the axes are resized by two nodes."""
    mode = b.attr("mode", "nearest")
    mode = {"bilinear": "linear", "trilinear": "linear"}.get(mode, mode)
    if mode not in ("nearest", "linear"):
        b.unsupported(f"{b.proto.op_type} mode '{mode}'")
    attrs = {"mode": mode, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    if mode == "linear" or not scales.is_const:
        b.emit("Resize", [b.input(0), None, scales, None], attrs)
        return
    s = np.asarray(scales.data, dtype=np.float32).reshape(-1)
    down = [i for i, v in enumerate(s) if v < 1.0]
    up = [i for i, v in enumerate(s) if v > 1.0]
    if not down:
        b.emit("Resize", [b.input(0), None, scales, None], attrs)
        return
    x = b.input(0)
    if up:
        x = b.emit("Resize", [x, None, b.const(s[up], hint="up_scales"), None], {**attrs, "axes": up},
                   outputs=1).outputs[0]
    b.emit("Resize", [x, None, b.const(s[down], hint="down_scales"), None],
           {**attrs, "axes": down, "nearest_mode": "ceil"})


@converter("Upsample", until=8)
def upsample_v7(b) -> None:
    scales = b.attr("scales")
    if scales is None:  # opset 1 spelled the two spatial scales as height_scale / width_scale
        scales = [1.0, 1.0, b.attr("height_scale", 1.0), b.attr("width_scale", 1.0)]
    _legacy_resize(b, b.const(np.asarray(scales, dtype=np.float32), hint="scales"))


@converter("Upsample", since=9)
def upsample_v9(b) -> None:
    _legacy_resize(b, b.input(1))


@converter("Resize", since=10, until=10)
def resize_v10(b) -> None:
    _legacy_resize(b, b.input(1))


@converter("Resize", since=11, until=12)
def resize_v11(b) -> None:
    if b.attr("coordinate_transformation_mode") == "tf_half_pixel_for_nn":
        b.unsupported("Resize coordinate_transformation_mode 'tf_half_pixel_for_nn' (removed in opset 13)")
    b.emit_default()


@converter("GridSample", since=16, until=19)
def grid_sample_v16(b) -> None:
    attrs = dict(b.attrs())
    mode = attrs.get("mode", "bilinear")
    attrs["mode"] = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    b.emit("GridSample", b.inputs(), attrs)
