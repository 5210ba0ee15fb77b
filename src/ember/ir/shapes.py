"""Shapes whose dims are ints or symbolic expressions over named dims (``batch``, ``seq``).

A symbolic dim is an immutable expression tree (``Sym``) over named symbols and integers: sums,
products, floor division, modulo, min and max. Trees are built only through ``Sym.named``, the
arithmetic operators and ``floordiv``/``mod``/``sym_min``/``sym_max``, which keep them in one
canonical form, so that equal expressions compare and hash equal wherever a simple normalization
shows it:

- a sum is flat, its like terms combined, its constant folded (``b*2 + 1 - b`` is ``b + 1``);
- a product is flat, with one integer coefficient and sorted factors, and is multiplied out over
  sums while that stays small (``2*(s + 1)`` is ``2*s + 2``);
- ``x//1`` is ``x``, ``(b*s)//s`` is ``b``, ``(2*h + 4)//2`` is ``h + 2``, ``(x//2)//3`` is ``x//6``;
- ``(2*h + 1) % 2`` is ``1``; min/max are flat, deduplicated, and drop an argument that differs
  from another by a constant (``min(s, s + 1)`` is ``s``).

No rule assumes anything about the symbols' values, so every rewrite holds for all integers (a
division by an expression that is zero at run time is undefined either way). A name is any string:
``seq-len`` or ``N/A`` is one symbol, never parsed. The text form (``str``) is for people only;
engine files store the tree itself (``ember.ir.serialize``).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

MAX_EXPANDED_TERMS = 64  # a product of sums is multiplied out only up to this many terms

_OPS = ("sym", "add", "mul", "floordiv", "mod", "min", "max")
_RANK = {op: i + 1 for i, op in enumerate(_OPS)}  # ints rank 0: they sort first


def _operator(op: str, reflected: bool = False) -> Callable[["Sym", object], "Dim"]:
    def method(self: "Sym", other: object) -> "Dim":
        o = _coerce(other)
        if o is None:
            return NotImplemented
        return _BINARY[op](o, self) if reflected else _BINARY[op](self, o)

    method.__name__ = f"__{'r' if reflected else ''}{op}__"
    return method


@dataclass(frozen=True, eq=False, repr=False)
class Sym:
    """A symbolic dim: one node of a canonical expression tree. Immutable and hashable.

    ``op`` is one of ``sym`` (``args == (name,)``), ``add``, ``mul``, ``floordiv``, ``mod``, ``min``,
    ``max``; ``args`` are ints and Syms. Build Syms with ``Sym.named`` and the operators: calling
    ``Sym(op, args)`` directly skips canonicalization.
    """

    op: str
    args: tuple
    depth: int = field(init=False)  # nesting depth of the tree (a symbol: 1)
    _key: tuple = field(init=False)  # total order over canonical trees; equal iff the trees are
    _hash: int = field(init=False)
    _symbols: frozenset = field(init=False)

    def __post_init__(self) -> None:
        if self.op == "sym":
            key: tuple = (1, self.args[0])
            depth = 1
        else:
            key = (_RANK[self.op], tuple(_key(a) for a in self.args))
            depth = 1 + max((a.depth for a in self.args if isinstance(a, Sym)), default=0)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "depth", depth)
        object.__setattr__(self, "_hash", hash((self.op, self.args)))
        object.__setattr__(self, "_symbols", frozenset(self.args) if self.op == "sym" else
                           frozenset().union(*(a._symbols for a in self.args if isinstance(a, Sym))))

    # -- construction ---------------------------------------------------------------------------
    @staticmethod
    def named(name: str) -> "Sym":
        """The symbol ``name``; any string is a name (``seq-len`` is one symbol, not a difference)."""
        if not isinstance(name, str):
            raise TypeError(f"a symbol name is a str, not {type(name).__name__}")
        return Sym("sym", (name,))

    # -- identity -------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Sym):
            return NotImplemented
        return self._hash == other._hash and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple:
        return (Sym, (self.op, self.args))  # rebuilt, not restored: str hashes differ between processes

    @property
    def name(self) -> "str | None":
        """The symbol's name when this is exactly one symbol, else None."""
        return self.args[0] if self.op == "sym" else None

    @property
    def symbols(self) -> frozenset[str]:
        """Names of the symbols the expression uses."""
        return self._symbols

    # -- arithmetic (with ints and Syms; the results are canonical) -------------------------------
    __add__, __radd__ = _operator("add"), _operator("add", reflected=True)
    __sub__, __rsub__ = _operator("sub"), _operator("sub", reflected=True)
    __mul__, __rmul__ = _operator("mul"), _operator("mul", reflected=True)
    __floordiv__, __rfloordiv__ = _operator("floordiv"), _operator("floordiv", reflected=True)
    __mod__, __rmod__ = _operator("mod"), _operator("mod", reflected=True)

    def __neg__(self) -> "Dim":
        return mul(-1, self)

    def __pos__(self) -> "Sym":
        return self

    # -- values ---------------------------------------------------------------------------------
    def evaluate(self, env: Mapping[str, int]) -> int:
        """The value for the symbol values in ``env``; KeyError names a symbol ``env`` lacks."""
        if self.op == "sym":
            return operator.index(env[self.args[0]])
        vals = [a if isinstance(a, int) else a.evaluate(env) for a in self.args]
        return _EVAL[self.op](vals)

    def subs(self, env: Mapping[str, "Dim"]) -> "Dim":
        """Replace the symbols ``env`` names (by ints or expressions); the others stay."""
        if self.op == "sym":
            return _as_dim(env[self.args[0]]) if self.args[0] in env else self
        if self._symbols.isdisjoint(env):
            return self
        return _BUILD[self.op](*(a if isinstance(a, int) else a.subs(env) for a in self.args))

    # -- text (for people; never parsed) --------------------------------------------------------
    def __str__(self) -> str:
        return self.args[0] if self.op == "sym" else _fmt(self)

    __repr__ = __str__


Dim = Union[int, Sym]


# -- canonical constructors -----------------------------------------------------------------------
def _coerce(x: object) -> "Dim | None":
    if isinstance(x, Sym):
        return x
    try:
        return operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        return None


def _as_dim(x: object) -> Dim:
    d = _coerce(x)
    if d is None:
        raise TypeError(f"a dim is an int or a Sym, not {type(x).__name__} ({x!r})")
    return d


def _key(x: Dim) -> tuple:
    return (0, x) if isinstance(x, int) else x._key


Monomial = tuple  # sorted tuple of non-int factors (Syms other than sums and products)
Poly = dict  # Monomial -> nonzero int coefficient; the constant under ()


def _split(t: Dim) -> tuple[int, Monomial]:
    """A term as (coefficient, factors)."""
    if isinstance(t, int):
        return t, ()
    if t.op == "mul":
        return (t.args[0], t.args[1:]) if isinstance(t.args[0], int) else (1, t.args)
    return 1, (t,)


def _poly(x: Dim) -> Poly:
    terms = x.args if isinstance(x, Sym) and x.op == "add" else (x,)
    out: Poly = {}
    for t in terms:
        c, m = _split(t)
        if c:
            out[m] = out.get(m, 0) + c
    return out


def _monomial(c: int, m: Monomial) -> Dim:
    sums = [f for f in m if f.op == "add"]
    if sums and _expanded_size(sums) <= MAX_EXPANDED_TERMS:
        return mul(c, *m)  # a quotient may leave sums small enough to multiply out: canonical again
    if not m or c == 0:
        return c
    if c == 1 and len(m) == 1:
        return m[0]
    return Sym("mul", ((c,) if c != 1 else ()) + tuple(m))


def _from_poly(p: Poly) -> Dim:
    terms: list[Dim] = []
    renormalized = False
    for m, c in p.items():
        if c:
            t = _monomial(c, m)
            renormalized |= _split(t) != (c, m)
            terms.append(t)
    if renormalized:
        return add(*terms)  # a monomial multiplied out into terms that may meet others: merge again
    if not terms:
        return 0
    if len(terms) == 1:
        return terms[0]
    return Sym("add", tuple(sorted(terms, key=_key)))


def _expanded_size(sums: list[Sym]) -> int:
    n = 1
    for s in sums:
        n *= len(s.args)
    return n


def add(*xs: object) -> Dim:
    """The canonical sum of dims."""
    p: Poly = {}
    for x in xs:
        for m, c in _poly(_as_dim(x)).items():
            p[m] = p.get(m, 0) + c
    return _from_poly(p)


def mul(*xs: object) -> Dim:
    """The canonical product of dims: multiplied out over sums while that stays small."""
    coef, factors, sums = 1, [], []
    for x in map(_as_dim, xs):
        if isinstance(x, int):
            coef *= x
        elif x.op == "add":
            sums.append(x)
        else:
            c, m = _split(x)
            coef *= c
            factors.extend(m)
    if coef == 0:
        return 0
    if sums and _expanded_size(sums) > MAX_EXPANDED_TERMS:
        factors.extend(sums)  # kept as factors: (a+b)*(c+d)*... would not stay small
        sums = []
    p: Poly = {tuple(sorted(factors, key=_key)): coef}
    for s in sums:
        q: Poly = {}
        for m1, c1 in p.items():
            for m2, c2 in _poly(s).items():
                m = tuple(sorted(m1 + m2, key=_key))
                q[m] = q.get(m, 0) + c1 * c2
        p = q
    if not sums and len(p) == 1:
        (m, c), = p.items()
        return c if not m else (m[0] if c == 1 and len(m) == 1 else Sym("mul", ((c,) if c != 1 else ()) + m))
    return _from_poly(p)


def _remove_factors(m: Monomial, sub: Monomial) -> "Monomial | None":
    rest = list(m)
    for f in sub:
        if f not in rest:
            return None
        rest.remove(f)
    return tuple(rest)


def _exact_quotient(a: Dim, b: Sym) -> "Dim | None":
    """a / b when it is exact for every value of the symbols, found by simple means, else None."""
    if a == b:
        return 1
    pa = _poly(a)
    if b.op != "add":  # a monomial: every term of a must contain its factors
        cb, mb = _split(b)
        q: Poly = {}
        for m, c in pa.items():
            rest = _remove_factors(m, mb)
            if rest is None or c % cb:
                return None
            q[rest] = c // cb
        return _from_poly(q)
    pb = _poly(b)  # a sum: a must be an integer multiple of it
    if pa.keys() != pb.keys():
        return None
    m0 = next(iter(pb))
    if pa[m0] % pb[m0]:
        return None
    k = pa[m0] // pb[m0]
    return k if all(pa[m] == k * pb[m] for m in pb) else None


def floordiv(a: object, b: object) -> Dim:
    """``a // b`` (floor division, as Python's) in canonical form."""
    a, b = _as_dim(a), _as_dim(b)
    if isinstance(b, int):
        if b == 0:
            raise ZeroDivisionError(f"dim expression {a} // 0")
        if isinstance(a, int):
            return a // b
        if b < 0:
            return floordiv(mul(-1, a), -b)  # floor(a / -b) == floor(-a / b)
        if b == 1:
            return a
        p = _poly(a)
        const = p.pop((), 0)
        if len(p) == 1:
            (m, c), = p.items()
            if c == 1 and len(m) == 1 and m[0].op == "floordiv" and isinstance(m[0].args[1], int):
                x, d = m[0].args  # (x//d + k)//b == (x + k*d)//(d*b) for d, b > 0
                return floordiv(add(x, const * d), d * b)
        # (b*q + r)//b == q + r//b: whole multiples of b leave the quotient, the constant in [0, b)
        q: Poly = {m: c // b for m, c in p.items() if c % b == 0}
        r: Poly = {m: c for m, c in p.items() if c % b != 0}
        q[()], r[()] = const // b, const % b
        if any(q.values()):
            return add(_from_poly(q), floordiv(_from_poly(r), b))
        return Sym("floordiv", (a, b))
    if a == 0:
        return 0
    exact = _exact_quotient(a, b)
    if exact is not None:
        return exact
    return Sym("floordiv", (a, b))


def mod(a: object, b: object) -> Dim:
    """``a % b`` (the sign of b, as Python's) in canonical form."""
    a, b = _as_dim(a), _as_dim(b)
    if isinstance(b, int):
        if b == 0:
            raise ZeroDivisionError(f"dim expression {a} % 0")
        if isinstance(a, int):
            return a % b
        if b < 0:
            return mul(-1, mod(mul(-1, a), -b))  # a % -b == -((-a) % b)
        if b == 1:
            return 0
        # multiples of b vanish: every coefficient and the constant reduce modulo b
        r = _from_poly({m: c % b for m, c in _poly(a).items()})
        if isinstance(r, int):
            return r % b
        if r.op == "mod" and isinstance(r.args[1], int) and r.args[1] % b == 0:
            return mod(r.args[0], b)  # (x % (k*b)) % b == x % b
        return Sym("mod", (r, b))
    if a == 0:
        return 0
    if _exact_quotient(a, b) is not None:
        return 0
    return Sym("mod", (a, b))


def _minmax(op: str, xs: tuple) -> Dim:
    if not xs:
        raise TypeError(f"{op}() of no dims")
    flat: list[Dim] = []
    for x in map(_as_dim, xs):
        flat.extend(x.args if isinstance(x, Sym) and x.op == op else (x,))
    pick = min if op == "min" else max
    ints = [x for x in flat if isinstance(x, int)]
    kept: list[Dim] = [pick(ints)] if ints else []
    for x in sorted({x for x in flat if isinstance(x, Sym)}, key=_key):
        for i, k in enumerate(kept):
            d = add(x, mul(-1, k))
            if isinstance(d, int):  # x and k differ by a constant: the extreme one decides
                if pick(d, 0) == d and d != 0:
                    kept[i] = x
                break
        else:
            kept.append(x)
    if len(kept) == 1:
        return kept[0]
    return Sym(op, tuple(sorted(kept, key=_key)))


def sym_min(*xs: object) -> Dim:
    """``min(...)`` over dims in canonical form."""
    return _minmax("min", xs)


def sym_max(*xs: object) -> Dim:
    """``max(...)`` over dims in canonical form."""
    return _minmax("max", xs)


def _prod(vals: list[int]) -> int:
    n = 1
    for v in vals:
        n *= v
    return n


_EVAL: dict[str, Callable[[list[int]], int]] = {
    "add": sum, "mul": _prod, "floordiv": lambda v: v[0] // v[1], "mod": lambda v: v[0] % v[1],
    "min": min, "max": max,
}
_BINARY: dict[str, Callable[[Dim, Dim], Dim]] = {
    "add": lambda a, b: add(a, b), "sub": lambda a, b: add(a, mul(-1, b)), "mul": lambda a, b: mul(a, b),
    "floordiv": floordiv, "mod": mod,
}
_BUILD: dict[str, Callable[..., Dim]] = {
    "add": add, "mul": mul, "floordiv": floordiv, "mod": mod, "min": sym_min, "max": sym_max,
}


def build(op: str, args: "list[Dim] | tuple[Dim, ...]") -> Dim:
    """The canonical dim for operator ``op`` over ``args`` (``sym``: ``args == [name]``)."""
    if op == "sym":
        (name,) = args
        return Sym.named(name)  # type: ignore[arg-type]
    if op not in _BUILD:
        raise ValueError(f"unknown dim operator '{op}'; known: {', '.join(_OPS)}")
    if op in ("floordiv", "mod") and len(args) != 2:
        raise ValueError(f"'{op}' takes 2 operands, not {len(args)}")
    return _BUILD[op](*args)


# -- text -----------------------------------------------------------------------------------------
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:]*\Z")


def _fmt(x: Dim, wrap: bool = False) -> str:
    """Python-like text; ``wrap``: parenthesize anything but a symbol, a call or a plain int."""
    if isinstance(x, int):
        return f"({x})" if wrap and x < 0 else str(x)
    op = x.op
    if op == "sym":
        name = x.args[0]
        return name if _PLAIN_NAME.match(name) else repr(name)  # 'seq-len'*2 is one symbol
    if op in ("min", "max"):
        return f"{op}({', '.join(_fmt(a) for a in x.args)})"
    if op in ("floordiv", "mod"):
        text = f"{_fmt(x.args[0], True)}{'//' if op == 'floordiv' else '%'}{_fmt(x.args[1], True)}"
    elif op == "mul":
        c, m = _split(x)
        body = "*".join(_fmt(f, f.op in ("add", "floordiv", "mod")) for f in m)
        text = body if c == 1 else "-" + body if c == -1 else f"{c}*{body}"
    else:  # add: terms in canonical order, the constant last
        terms = [t for t in x.args if not isinstance(t, int)] + [t for t in x.args if isinstance(t, int)]
        text = _fmt(terms[0])
        for t in terms[1:]:
            s = _fmt(t)
            text += s if s.startswith("-") else "+" + s
    return f"({text})" if wrap else text


def dim_str(d: Dim) -> str:
    return str(d)


def shape_str(shape: "tuple[Dim, ...] | None") -> str:
    if shape is None:
        return "?"
    return "[" + ",".join(str(d) for d in shape) + "]"


# -- shapes ---------------------------------------------------------------------------------------
def as_symbol(d: Dim) -> "str | None":
    """The name of ``d`` when it is exactly one named symbol (``batch``), else None."""
    return d.args[0] if isinstance(d, Sym) and d.op == "sym" else None


def is_static(shape: "tuple[Dim, ...] | None") -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def numel(shape: tuple[Dim, ...]) -> Dim:
    return mul(1, *shape)


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Numpy broadcasting over symbolic dims. Raises ValueError when static dims disagree."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        non_one = [d for d in dims if d != 1]
        if not non_one:
            out.append(1)
            continue
        statics = {d for d in non_one if isinstance(d, int)}
        if len(statics) > 1:
            raise ValueError(f"shapes {[tuple(map(str, s)) for s in shapes]} do not broadcast at axis {i}")
        if statics:
            out.append(statics.pop())
        else:
            out.append(non_one[0])  # assume equal symbols; checked at run time
    return tuple(out)


def substitute(shape: tuple[Dim, ...], env: Mapping[str, Dim]) -> tuple[Dim, ...]:
    """Replace the symbols ``env`` names, in every dim; the others stay symbolic."""
    return tuple(d if isinstance(d, int) else d.subs(env) for d in shape)
