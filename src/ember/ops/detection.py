"""Detection heads: RoiAlign and NonMaxSuppression.

Both have data-dependent shapes or per-box geometry, so they loop over boxes on the host and
vectorize what each box does on the device.
"""
from __future__ import annotations

import math

import torch

from ..ir.dtypes import DType
from ..ir.graph import Node
from .infer import fresh_dim
from .nn import compute_dtype
from .registry import op, shape_rule


def _roi_axis(start: float, bin_size: float, pooled: int, grid: int, length: int, dev, ct):
    """Low/high sample indices, the weight of the high one, and validity, for one axis of one ROI."""
    i = torch.arange(pooled * grid, device=dev, dtype=torch.float64)
    pos = start + (i // grid) * bin_size + ((i % grid) + 0.5) * bin_size / grid
    valid = (pos >= -1.0) & (pos <= length)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_end = low >= length - 1
    low = torch.where(at_end, torch.full_like(low, length - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(pos), pos - low.to(pos.dtype))
    return low, high, frac.to(ct), valid


@op("RoiAlign", kind="other")
def roi_align(x, rois, batch_indices, *, coordinate_transformation_mode: str = "half_pixel", mode: str = "avg",
              output_height: int = 1, output_width: int = 1, sampling_ratio: int = 0, spatial_scale: float = 1.0):
    ct = compute_dtype(x)
    xf = x.to(ct)
    N, C, H, W = x.shape
    oh, ow = output_height, output_width
    half = coordinate_transformation_mode == "half_pixel"
    out = torch.zeros(rois.shape[0], C, oh, ow, dtype=ct, device=x.device)
    boxes = rois.detach().to(torch.float64).cpu().tolist()
    batches = batch_indices.detach().cpu().tolist()
    for r, (box, b) in enumerate(zip(boxes, batches)):
        off = 0.5 if half else 0.0
        x0, y0, x1, y1 = (v * spatial_scale - off for v in box)
        rw, rh = x1 - x0, y1 - y0
        if not half:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rh / oh))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rw / ow))
        count = max(gh * gw, 1)
        if gh == 0 or gw == 0:
            continue
        yl, yh, ly, vy = _roi_axis(y0, rh / oh, oh, gh, H, x.device, ct)
        xl, xh, lx, vx = _roi_axis(x0, rw / ow, ow, gw, W, x.device, ct)
        img = xf[int(b)]
        valid = (vy[:, None] & vx[None, :]).to(ct)
        corners = [(yl, xl, (1 - ly)[:, None] * (1 - lx)[None, :]), (yl, xh, (1 - ly)[:, None] * lx[None, :]),
                   (yh, xl, ly[:, None] * (1 - lx)[None, :]), (yh, xh, ly[:, None] * lx[None, :])]
        terms = [img[:, yi][:, :, xi] * (w * valid) for yi, xi, w in corners]  # each (C, oh*gh, ow*gw)
        if mode == "avg":
            s = sum(terms).reshape(C, oh, gh, ow, gw).sum(dim=(2, 4)) / count
        else:  # ONNX (and onnxruntime) max mode: max over samples of the max weighted corner
            s = torch.stack(terms).amax(0).reshape(C, oh, gh, ow, gw).amax(dim=(2, 4))
        out[r] = s
    return out.to(x.dtype)


@shape_rule("RoiAlign")
def _roi_align_rule(node: Node):
    x, rois = node.inputs[0], node.inputs[1]
    if x.shape is None or rois.shape is None:
        return [(x.dtype, None)]
    a = node.attrs
    return [(x.dtype, (rois.shape[0], x.shape[1], a.get("output_height", 1), a.get("output_width", 1)))]


def _suppressing_pairs(boxes: torch.Tensor, center_point_box: int, iou_threshold: float) -> torch.Tensor:
    """(B, B) bool: box i and box j overlap by more than the threshold."""
    b = boxes.to(torch.float64)
    if center_point_box:
        cx, cy, w, h = b.unbind(-1)
        x1, x2, y1, y2 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    else:
        ya, xa, yb, xb = b.unbind(-1)
        y1, y2 = torch.minimum(ya, yb), torch.maximum(ya, yb)
        x1, x2 = torch.minimum(xa, xb), torch.maximum(xa, xb)
    iw = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :]))
    ih = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :]))
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    area = (x2 - x1) * (y2 - y1)
    union = area[:, None] + area[None, :] - inter
    ok = (iw > 0) & (ih > 0) & (area[:, None] > 0) & (area[None, :] > 0) & (union > 0)
    iou = inter / torch.where(union > 0, union, torch.ones_like(union))
    return ok & (iou > iou_threshold)


@op("NonMaxSuppression", kind="other")
def non_max_suppression(boxes, scores, max_output_boxes_per_class=None, iou_threshold=None, score_threshold=None,
                        *, center_point_box: int = 0):
    def scalar(t, default):
        return default if t is None or t.numel() == 0 else t.reshape(-1)[0].item()

    max_out = max(int(scalar(max_output_boxes_per_class, 0)), 0)
    iou_thr = float(scalar(iou_threshold, 0.0))
    score_thr = None if score_threshold is None or score_threshold.numel() == 0 else float(scalar(score_threshold, 0))
    selected: list[tuple[int, int, int]] = []
    nb, nc = scores.shape[:2]
    for bi in range(nb):
        if max_out == 0:
            break
        suppress = _suppressing_pairs(boxes[bi], center_point_box, iou_thr).cpu().numpy()
        for ci in range(nc):
            s = scores[bi, ci].to(torch.float64)
            order = torch.sort(-s, stable=True).indices  # highest score first, ties by lower index
            if score_thr is not None:
                order = order[s[order] > score_thr]
            kept: list[int] = []
            for i in order.cpu().tolist():
                if len(kept) >= max_out:
                    break
                if not suppress[i, kept].any():
                    kept.append(i)
                    selected.append((bi, ci, i))
    return torch.tensor(selected, dtype=torch.int64, device=boxes.device).reshape(-1, 3)


@shape_rule("NonMaxSuppression")
def _nms_rule(node: Node):
    return [(DType.INT64, (fresh_dim(), 3))]  # how many boxes survive is known only at run time
