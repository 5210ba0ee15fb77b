"""Symbolic dims: canonical expression trees, structural JSON, and their properties (hypothesis)."""
from __future__ import annotations

import json
import pickle
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ember.ir.serialize import dim_from_json, dim_to_json
from ember.ir.shapes import Dim, Sym, as_symbol, floordiv, mod, substitute, sym_max, sym_min

NAMES = ["batch", "seq", "h", "seq-len", "N/A", "floor(x)", "Squeeze/decoder/Squeeze_output_0_dim_0", "", "3",
         "a b"]
B, S, H = Sym.named("batch"), Sym.named("seq"), Sym.named("h")


def roundtrip(d: Dim) -> Dim:
    return dim_from_json(json.loads(json.dumps(dim_to_json(d))))


# -- the examples -------------------------------------------------------------------------
def test_precedence_survives_the_engine_file():
    e = 2 * B * (S // 2)
    assert str(e) == "2*batch*(seq//2)"
    assert roundtrip(e) == e and roundtrip(e) != B * S
    assert e.evaluate({"batch": 3, "seq": 7}) == 18 and roundtrip(e).evaluate({"batch": 3, "seq": 7}) == 18
    a, b = 3 * (H // 2), (3 * H) // 2
    assert a != b and str(a) == "3*(h//2)" and str(b) == "(3*h)//2"
    assert roundtrip(a) == a and roundtrip(b) == b
    assert a.evaluate({"h": 5}) == 6 and b.evaluate({"h": 5}) == 7


@pytest.mark.parametrize("name", ["seq-len", "N/A", "floor(DynamicDimension.1/2 - 1/2) + 1", "x//2", "",
                                  "Squeeze/decoder/Squeeze_output_0_dim_0", "7"])
def test_any_string_is_one_symbol(name):
    d = Sym.named(name)
    assert as_symbol(d) == name and d.symbols == {name} and str(d) == name
    assert roundtrip(d) == d and as_symbol(roundtrip(d)) == name
    e = 2 * d + 1
    assert e.symbols == {name} and e.evaluate({name: 4}) == 9 and roundtrip(e) == e
    assert as_symbol(e) is None


def test_canonical_forms():
    assert B * 2 + 1 - B == B + 1
    assert (B - B) == 0 and isinstance(B - B, int)
    assert (B * S) // S == B and (B * 4) // 2 == 2 * B and (2 * H + 4) // 2 == H + 2
    assert (2 * H + 1) % 2 == 1 and (B * S) % S == 0 and H // 1 == H and H % 1 == 0
    assert (H // 2) // 3 == H // 6 and ((H - 1) // 2) // 2 == (H + 3) // 4 - 1
    assert 2 * (S + 1) == 2 * S + 2 and (B + 1) * (S + 1) == B * S + B + S + 1
    assert (2 * S + 2) // (S + 1) == 2 and (2 * S + 2) % (S + 1) == 0
    assert sym_min(S, S + 1) == S and sym_max(S, S + 1, 3, 5) == sym_max(5, S + 1)
    assert sym_min(sym_min(B, S), H) == sym_min(H, S, B) and sym_min(B, B) == B and sym_min(3, 4) == 3
    assert floordiv(7, 2) == 3 and mod(-7, 2) == 1 and floordiv(H, -2) == floordiv(-H, 2)
    assert hash(B * S) == hash(S * B) and {B * S: 1}[S * B] == 1
    with pytest.raises(ZeroDivisionError):
        H // 0
    with pytest.raises(TypeError):
        H + 1.5


@pytest.mark.parametrize("k, s, p", [(3, 2, 1), (7, 2, 3), (3, 1, 0), (2, 2, 0), (5, 3, 2), (1, 4, 0)])
def test_sliding_window_chains_match_python(k, s, p):
    """Three windows after each other, then a ceil division, over every h in a range (signs too)."""
    def size(h):
        for _ in range(3):
            h = (h + 2 * p - k) // s + 1
        return -(-h // 3) + h % 5
    e = size(H)
    for h in range(-40, 80):
        assert e.evaluate({"h": h}) == size(h), (str(e), h)
    assert roundtrip(e) == e


def test_substitute_is_partial():
    e = B * S + H // 2
    assert substitute((e, 3), {"batch": 2}) == (2 * S + H // 2, 3)
    assert e.subs({"batch": 2, "seq": 3, "h": 5}) == 8 and e.subs({"batch": S}) == S * S + H // 2
    with pytest.raises(KeyError, match="seq"):
        e.evaluate({"batch": 1, "h": 1})


def test_products_of_many_sums_stay_factored():
    sums = [Sym.named(f"a{i}") + Sym.named(f"b{i}") for i in range(8)]  # 256 terms multiplied out
    e = sums[0]
    for s in sums[1:]:
        e = e * s
    env = {f"{p}{i}": i + 2 for i in range(8) for p in "ab"}
    want = 1
    for i in range(8):
        want *= 2 * (i + 2)
    assert e.evaluate(env) == want and roundtrip(e) == e


# -- properties -----------------------------------------------------------------------------------
_leaves = st.one_of(st.integers(-8, 8).map(lambda n: ("int", n)), st.sampled_from(NAMES).map(lambda s: ("sym", s)))
_trees = st.recursive(
    _leaves,
    lambda kids: st.one_of(
        st.tuples(st.sampled_from(["add", "sub", "mul", "floordiv", "mod"]), kids, kids),
        st.tuples(st.sampled_from(["min", "max"]), st.lists(kids, min_size=1, max_size=3)),
        st.tuples(st.just("neg"), kids)),
    max_leaves=14)


def build(t: tuple) -> Dim:
    """The canonical dim of a raw tree, built with the public operators (ZeroDivisionError: x // 0)."""
    op = t[0]
    if op == "int":
        return t[1]
    if op == "sym":
        return Sym.named(t[1])
    if op == "neg":
        return -build(t[1])  # type: ignore[operator]
    if op in ("min", "max"):
        return (sym_min if op == "min" else sym_max)(*(build(k) for k in t[1]))
    a, b = build(t[1]), build(t[2])
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    return floordiv(a, b) if op == "floordiv" else mod(a, b)


def raw_eval(t: tuple, env: dict[str, int]) -> Optional[int]:
    """Python's own integer arithmetic over the raw tree; None where it divides by zero."""
    op = t[0]
    if op == "int":
        return t[1]
    if op == "sym":
        return env[t[1]]
    if op == "neg":
        v = raw_eval(t[1], env)
        return None if v is None else -v
    if op in ("min", "max"):
        vals = [raw_eval(k, env) for k in t[1]]
        return None if None in vals else (min if op == "min" else max)(vals)
    a, b = raw_eval(t[1], env), raw_eval(t[2], env)
    if a is None or b is None or (op in ("floordiv", "mod") and b == 0):
        return None
    return {"add": a + b, "sub": a - b, "mul": a * b}.get(op) if op not in ("floordiv", "mod") else \
        (a // b if op == "floordiv" else a % b)


def canonical(t: tuple) -> Dim:
    try:
        return build(t)
    except ZeroDivisionError:
        assume(False)
        raise


# shape arithmetic as exporters chain it: (h + pads - k)//s + 1, then again, with sums and min/max
_ints = st.integers(-9, 9).map(lambda n: ("int", n))
_steps = st.lists(st.tuples(st.sampled_from(["add", "sub", "floordiv", "floordiv", "mul", "mod", "min", "max", "neg"]),
                            st.one_of(_ints, _ints, _ints, st.sampled_from(NAMES[:3]).map(lambda s: ("sym", s)))),
                  min_size=1, max_size=10)
_chains = st.tuples(st.sampled_from(NAMES).map(lambda s: ("sym", s)), _steps).map(
    lambda c: _chain(*c))


def _chain(t: tuple, steps: list) -> tuple:
    for op, x in steps:
        t = (op, t) if op == "neg" else (op, [t, x]) if op in ("min", "max") else (op, t, x)
    return t


_exprs = st.one_of(_trees, _chains)
_positive_env = st.fixed_dictionaries({n: st.integers(1, 40) for n in NAMES})
_any_env = st.fixed_dictionaries({n: st.integers(-30, 30) for n in NAMES})
_settings = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(_exprs, _positive_env)
def test_evaluation_agrees_with_python(t, env):
    d = canonical(t)
    want = raw_eval(t, env)
    assume(want is not None)
    assert (d if isinstance(d, int) else d.evaluate(env)) == want


@_settings
@given(_exprs, _any_env)
def test_rewrites_assume_nothing_about_signs(t, env):
    d = canonical(t)
    want = raw_eval(t, env)
    assume(want is not None)
    assert (d if isinstance(d, int) else d.evaluate(env)) == want


@_settings
@given(_exprs)
def test_json_round_trip_is_the_identity(t):
    d = canonical(t)
    back = roundtrip(d)
    assert back == d and hash(back) == hash(d) and type(back) is type(d)
    assert str(back) == str(d) and dim_to_json(back) == dim_to_json(d)  # canonicalization is stable
    assert pickle.loads(pickle.dumps(d)) == d


@_settings
@given(_trees, _trees)
def test_eq_and_hash_agree_with_structure(t1, t2):
    a, b = canonical(t1), canonical(t2)
    same = dim_to_json(a) == dim_to_json(b)
    assert (a == b) == same
    if same:
        assert hash(a) == hash(b)
    assert a + b == b + a and a * b == b * a and hash(a + b) == hash(b + a)
    assert (a + b) - b == a and a * 1 == a and floordiv(a, 1) == a


@_settings
@given(_exprs, _positive_env, st.sets(st.sampled_from(NAMES)))
def test_partial_substitution_then_evaluation(t, env, known):
    d = canonical(t)
    want = raw_eval(t, env)
    assume(want is not None and isinstance(d, Sym))
    try:
        part = d.subs({k: env[k] for k in known})
    except ZeroDivisionError:
        assume(False)
    assert (part if isinstance(part, int) else part.evaluate(env)) == want


def _deep(levels: int, wrap) -> Any:
    x: Any = {"sym": "a"}
    for _ in range(levels):
        x = wrap(x)
    return x


@pytest.mark.parametrize("bad, msg", [
    ("batch", "is text"), ({"sym": 3}, "string"), ({"pow": [1, 2]}, "unknown dim operator"),
    ({"floordiv": [{"sym": "a"}]}, "2 operands"), ({"add": []}, "non-empty"), ({"mod": [{"sym": "a"}, 0]}, "zero"),
    (True, "an int or an object"), (2**70, "int64"), ({"sym": "a", "add": [1]}, "one key"),
    (_deep(100_000, lambda x: {"add": [x, 1]}), "deeper than"),
    (_deep(100_000, lambda x: {"min": [x]}), "deeper than"),
])
def test_malformed_dims_are_format_errors(bad, msg):
    from ember.ir.serialize import FormatError

    with pytest.raises(FormatError, match=msg):
        dim_from_json(bad, "graph 'g', input 0 ('x'), axis 1")
