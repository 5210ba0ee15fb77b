"""Losses: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss (inputs (N, C, d1, ...))."""
from __future__ import annotations

from typing import Optional

import torch

from .registry import op, shape_rule


def nll(log_prob: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
        ignore_index: Optional[int], reduction: str) -> torch.Tensor:
    """-log_prob[n, target[n, ...], ...] * weight[target], ignored targets weigh 0.

    'mean' divides by the total weight of the targets that count, as ONNX (and torch) do.
    """
    t = target.to(torch.int64)
    keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    t_safe = torch.where(keep, t, torch.zeros_like(t))
    picked = -torch.gather(log_prob, 1, t_safe.unsqueeze(1)).squeeze(1)
    w = weight[t_safe] if weight is not None else torch.ones_like(picked)
    w = torch.where(keep, w.to(picked.dtype), torch.zeros_like(picked))
    loss = picked * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / w.sum()
    raise ValueError(f"reduction must be none, sum or mean, not {reduction!r}")


@op("NegativeLogLikelihoodLoss", kind="other")
def negative_log_likelihood_loss(input, target, weight=None, *, ignore_index: Optional[int] = None,  # noqa: A002
                                 reduction: str = "mean"):
    return nll(input, target, weight, ignore_index, reduction)


@op("SoftmaxCrossEntropyLoss", kind="other")
def softmax_cross_entropy_loss(scores, labels, weights=None, *, ignore_index: Optional[int] = None,
                               reduction: str = "mean"):
    """Outputs the loss and, when asked for, the log-probabilities."""
    compute = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    log_prob = torch.log_softmax(compute, dim=1)
    loss = nll(log_prob, labels, weights.to(compute.dtype) if weights is not None else None, ignore_index,
               reduction)
    return loss.to(scores.dtype), log_prob.to(scores.dtype)


def _loss_shape(x, target, reduction: str):
    if reduction != "none":
        return ()
    return target.shape


@shape_rule("NegativeLogLikelihoodLoss")
def _nll_rule(node):
    x, t = node.inputs[:2]
    return [(x.dtype, _loss_shape(x, t, node.attrs.get("reduction", "mean")))]


@shape_rule("SoftmaxCrossEntropyLoss")
def _sce_rule(node):
    x, t = node.inputs[:2]
    return [(x.dtype, _loss_shape(x, t, node.attrs.get("reduction", "mean"))), (x.dtype, x.shape)]
