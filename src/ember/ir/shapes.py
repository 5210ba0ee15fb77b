"""Shapes whose dims are ints or symbolic expressions over named dims (``batch``, ``seq``).

A symbolic dim is a polynomial with integer coefficients over atoms; an atom is a named symbol
or an opaque floor-division/other term. That is enough for what exporters emit
(``batch*seq``, ``seq+1``, ``(h-3)//2+1``) and keeps equality a structural comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Monomial = tuple[str, ...]  # sorted atom names, repeated for powers


@dataclass(frozen=True)
class Sym:
    """A symbolic dim: sum of coef * monomial. Immutable and hashable."""

    terms: tuple[tuple[Monomial, int], ...]  # sorted, no zero coefficients

    @staticmethod
    def named(name: str) -> "Sym":
        return Sym((((name,), 1),))

    @staticmethod
    def _make(d: dict[Monomial, int]) -> "Dim":
        items = tuple(sorted((m, c) for m, c in d.items() if c != 0))
        if not items:
            return 0
        if len(items) == 1 and items[0][0] == ():
            return items[0][1]
        return Sym(items)

    def _dict(self) -> dict[Monomial, int]:
        return dict(self.terms)

    @staticmethod
    def _as_dict(x: "Dim") -> dict[Monomial, int]:
        return x._dict() if isinstance(x, Sym) else ({(): int(x)} if x else {})

    def __add__(self, other: "Dim") -> "Dim":
        d = self._dict()
        for m, c in Sym._as_dict(other).items():
            d[m] = d.get(m, 0) + c
        return Sym._make(d)

    __radd__ = __add__

    def __neg__(self) -> "Dim":
        return Sym._make({m: -c for m, c in self.terms})

    def __sub__(self, other: "Dim") -> "Dim":
        return self + (-other if isinstance(other, Sym) else -int(other))

    def __rsub__(self, other: "Dim") -> "Dim":
        return (-self) + other

    def __mul__(self, other: "Dim") -> "Dim":
        out: dict[Monomial, int] = {}
        for m1, c1 in self.terms:
            for m2, c2 in Sym._as_dict(other).items():
                m = tuple(sorted(m1 + m2))
                out[m] = out.get(m, 0) + c1 * c2
        return Sym._make(out)

    __rmul__ = __mul__

    def __floordiv__(self, other: "Dim") -> "Dim":
        if isinstance(other, int):
            if other == 1:
                return self
            if all(c % other == 0 for _, c in self.terms):
                return Sym._make({m: c // other for m, c in self.terms})
        if isinstance(other, Sym) and other == self:
            return 1
        # exact division of a monomial product by one of its atoms (batch*seq // seq)
        if isinstance(other, Sym) and len(other.terms) == 1 and other.terms[0][1] == 1:
            (atoms, _), = other.terms
            out = {}
            for m, c in self.terms:
                rest = list(m)
                for a in atoms:
                    if a not in rest:
                        break
                    rest.remove(a)
                else:
                    out[tuple(rest)] = c
                    continue
                break
            else:
                return Sym._make(out)
        return Sym.named(f"({self})//({other})")

    def __str__(self) -> str:
        parts = []
        for m, c in self.terms:
            body = "*".join(m)
            if not body:
                parts.append(str(c))
            elif c == 1:
                parts.append(body)
            elif c == -1:
                parts.append("-" + body)
            else:
                parts.append(f"{c}*{body}")
        s = "+".join(parts).replace("+-", "-")
        return s

    __repr__ = __str__

    @property
    def symbols(self) -> set[str]:
        return {a for m, _ in self.terms for a in m}

    def evaluate(self, env: dict[str, int]) -> int:
        total = 0
        for m, c in self.terms:
            v = c
            for a in m:
                if a not in env:
                    raise KeyError(a)
                v *= env[a]
            total += v
        return total


Dim = Union[int, Sym]


def as_symbol(d: "Dim") -> "str | None":
    """The name of ``d`` when it is exactly one named symbol (``batch``), else None."""
    if isinstance(d, Sym) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1:
        return d.terms[0][0][0]
    return None


def parse_dim(text: "str | int") -> Dim:
    """'batch' -> Sym, '3' -> 3, '' / '?' -> a fresh unknown symbol is the caller's job."""
    if isinstance(text, int):
        return text
    t = str(text).strip()
    if t.lstrip("-").isdigit():
        return int(t)
    return parse_expr(t)


def parse_expr(t: str) -> Dim:
    """Parse the printed form of a Sym back (used by the engine file): +, -, *, // and parentheses."""
    pos = 0

    def peek() -> str:
        return t[pos] if pos < len(t) else ""

    def atom() -> Dim:
        nonlocal pos
        if peek() == "(":
            depth, start = 0, pos
            while pos < len(t):
                if t[pos] == "(":
                    depth += 1
                elif t[pos] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                pos += 1
            pos += 1
            inner = t[start + 1:pos - 1]
            return parse_expr(inner)
        start = pos
        while pos < len(t) and (t[pos].isalnum() or t[pos] in "_.:"):
            pos += 1
        word = t[start:pos]
        if not word:
            raise ValueError(f"cannot parse dim expression '{t}'")
        return int(word) if word.isdigit() else Sym.named(word)

    def term() -> Dim:
        nonlocal pos
        v = atom()
        while True:
            if t.startswith("//", pos):
                pos += 2
                rhs = atom()
                if isinstance(v, int) and isinstance(rhs, int):
                    v = v // rhs
                elif isinstance(v, int):
                    v = Sym.named(f"({v})//({rhs})")
                else:
                    v = v // rhs
            elif peek() == "*":
                pos += 1
                v = v * atom()
            else:
                return v

    sign = 1
    if peek() == "-":
        pos += 1
        sign = -1
    total: Dim = sign * term() if sign == 1 else -term()  # type: ignore[operator]
    while pos < len(t):
        if peek() == "+":
            pos += 1
            total = total + term()
        elif peek() == "-":
            pos += 1
            total = total - term()
        else:
            raise ValueError(f"cannot parse dim expression '{t}' at position {pos}")
    return total


def dim_str(d: Dim) -> str:
    return str(d)


def is_static(shape: "tuple[Dim, ...] | None") -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def numel(shape: tuple[Dim, ...]) -> Dim:
    n: Dim = 1
    for d in shape:
        n = n * d
    return n


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


def shape_str(shape: "tuple[Dim, ...] | None") -> str:
    if shape is None:
        return "?"
    return "[" + ",".join(str(d) for d in shape) + "]"


def substitute(shape: tuple[Dim, ...], env: dict[str, int]) -> tuple[Dim, ...]:
    """Replace known symbols by ints; leaves unknown ones symbolic."""
    out: list[Dim] = []
    for d in shape:
        if isinstance(d, Sym):
            try:
                out.append(d.evaluate(env))
            except KeyError:
                out.append(d)
        else:
            out.append(d)
    return tuple(out)
