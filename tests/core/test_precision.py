"""Reduced precision: which layers convert, the casts between them, and which layers the builder
keeps in fp32 because they are faster there, casts included (builder/precision.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.builder.precision import choose_fp32_for_speed, convert_precision, lowerable
from ember.builder.tuner import TimingCache, select_tactics
from ember.ir.dtypes import DType
from ember.ir.graph import Graph
from ember.ops.infer import infer_shapes


def chain() -> Graph:
    """x -> conv c1 -> sigmoid a -> tanh b -> conv c2 -> y (every op has a low-precision rule)."""
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_input("x", DType.FLOAT32, (1, 4, 5, 5))
    w1 = g.add_const("w1", rng.standard_normal((4, 4, 1, 1)).astype(np.float32))
    w2 = g.add_const("w2", rng.standard_normal((4, 4, 1, 1)).astype(np.float32))
    c1 = g.add_node("Conv", [x, w1], 1, name="c1")
    a = g.add_node("Sigmoid", c1.outputs, 1, name="a")
    b = g.add_node("Tanh", a.outputs, 1, name="b")
    c2 = g.add_node("Conv", [b.outputs[0], w2], 1, name="c2")
    g.outputs = list(c2.outputs)
    infer_shapes(g)
    return g


def low_chain(keep=None) -> tuple[Graph, list]:
    g = chain()
    kept = convert_precision(g, DType.FLOAT16, keep)
    return g, kept


def test_keep_names_layers_and_says_why():
    g, kept = low_chain({"a": ("accuracy", "output drift 2e-02"), "b": ("speed", "fp32 1 us vs 3 us")})
    assert [str(k) for k in kept] == ["a (Sigmoid): accuracy, output drift 2e-02", "b (Tanh): speed, fp32 1 us vs 3 us"]
    dtypes = {n.name: n.outputs[0].dtype for n in g.nodes}
    assert dtypes["c1"] == DType.FLOAT16 and dtypes["a"] == DType.FLOAT32 and dtypes["c2"] == DType.FLOAT16
    casts = [n for n in g.nodes if n.op == "Cast"]
    assert casts and all(n.meta.get("precision_cast") for n in casts)
    assert g.outputs[0].dtype == DType.FLOAT32  # the engine's output keeps its declared type
    assert lowerable(chain()) == ["c1", "a", "b", "c2"]


# node -> (ms as built in fp16, ms in fp32); casts: value -> ms
def times(**nodes: tuple[float, float]) -> dict[str, tuple[float, float]]:
    base = {"c1": (1.0, 30.0), "a": (1.0, 1.0), "b": (1.0, 1.0), "c2": (1.0, 30.0)}  # the convs want fp16
    return {**base, **nodes}


def casts(ms: float) -> dict[str, float]:
    return {v: ms for v in ("x", "c1", "a", "b", "c2")}


def test_nothing_changes_when_fp16_is_as_fast():
    g, _ = low_chain()
    assert choose_fp32_for_speed(g, times(), casts(0.1)) == {}


def test_a_slow_fp16_layer_goes_fp32_when_its_casts_cost_less_than_it_saves():
    g, _ = low_chain()
    chosen = choose_fp32_for_speed(g, times(a=(10.0, 1.0)), casts(0.5))
    assert set(chosen) == {"a"} and "fp32" in chosen["a"]
    assert choose_fp32_for_speed(g, times(a=(10.0, 1.0)), casts(10.0)) == {}  # casts dearer than the gain


def test_neighbours_go_fp32_together_when_only_together_they_win():
    g, _ = low_chain()
    # alone, each pays two casts (1 + 2 * 2.5 > 4); together only the two at the ends of the pair
    chosen = choose_fp32_for_speed(g, times(a=(4.0, 1.0), b=(4.0, 1.0)), casts(2.5))
    assert set(chosen) == {"a", "b"}


def test_the_input_cast_counts():
    g, _ = low_chain()
    # c1 in fp32 reads x as it comes (no cast) and hands a an fp16 cast of its output: 1.65 + 1 < 2 + 1.5
    chosen = choose_fp32_for_speed(g, times(c1=(2.0, 1.5)), {"x": 1.5, "c1": 1.0, "a": 9.0, "b": 9.0, "c2": 9.0})
    assert set(chosen) == {"c1"}
    # and so does the output's: c2 in fp32 writes y as declared, without a cast after it
    chosen = choose_fp32_for_speed(g, times(c2=(2.0, 1.5)), {"x": 9.0, "c1": 9.0, "a": 9.0, "b": 1.0, "c2": 1.5})
    assert set(chosen) == {"c2"}


def test_the_tuner_times_each_low_layer_in_fp32_and_every_cast():
    g, _ = low_chain()
    cache = TimingCache.open(None)
    feeds = {"x": torch.randn(1, 4, 5, 5)}
    report = select_tactics(g, torch.device("cpu"), feeds, 1, cache, low=torch.float16)
    assert set(report.node_ms) == {"c1", "a", "b", "c2"}
    assert all(lo > 0 and hi > 0 for lo, hi in report.node_ms.values())
    assert {"x", "c1", "a", "b", "c2"} <= set(report.cast_ms)
    # the fp32 twins' timings are cached under the signature the layer has once kept fp32
    g32, _ = low_chain({n: ("speed", "") for n in ("c1", "a", "b", "c2")})
    again = select_tactics(g32, torch.device("cpu"), feeds, 1, cache, low=torch.float16)
    assert again.node_ms == {}  # nothing computes in fp16 any more


def test_a_warm_rebuild_times_no_reference_twin_or_cast_again(monkeypatch):
    from ember.builder import precision_timing, tuner

    g, _ = low_chain()
    cache = TimingCache.open(None)
    feeds = {"x": torch.randn(1, 4, 5, 5)}
    first = select_tactics(g, torch.device("cpu"), feeds, 1, cache, low=torch.float16)

    def no_timing(*a, **k):
        raise AssertionError("timed again")

    monkeypatch.setattr(tuner, "_time", no_timing)
    monkeypatch.setattr(precision_timing, "_time", no_timing)
    g2, _ = low_chain()
    again = select_tactics(g2, torch.device("cpu"), feeds, 1, cache, low=torch.float16)
    assert again.node_ms == first.node_ms and again.cast_ms == first.cast_ms
