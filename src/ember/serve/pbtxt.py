"""A small reader for protobuf text format, enough for Triton's config.pbtxt.

No schema is needed: every field maps to a list of its values (a field may repeat), messages
become nested dicts of the same form, enum names stay strings, `true`/`false` become bools.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PbMessage = dict[str, list[Any]]

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[{}\[\]:,;<>])
""", re.VERBOSE)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0"}


@dataclass
class _Tok:
    kind: str
    text: str
    line: int


class PbtxtError(ValueError):
    """Syntax error in a text-format file; the message names the line."""


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise PbtxtError(f"line {line}: unexpected character {text[pos]!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            toks.append(_Tok(kind, m.group(), line))
        line += m.group().count("\n")
        pos = m.end()
    return toks


def _unquote(s: str) -> str:
    body, out, i = s[1:-1], [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            out.append(_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


class _Parser:
    def __init__(self, toks: list[_Tok]):
        self.toks, self.i = toks, 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            last = self.toks[-1].line if self.toks else 1
            raise PbtxtError(f"line {last}: unexpected end of file")
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text:
            raise PbtxtError(f"line {tok.line}: expected {text!r}, found {tok.text!r}")

    def message(self, close: str | None) -> PbMessage:
        msg: PbMessage = {}
        while True:
            tok = self.peek()
            if tok is None:
                if close is not None:
                    self.take()
                return msg
            if close is not None and tok.text == close:
                self.take()
                return msg
            if tok.text in ",;":
                self.take()
                continue
            name = self.take()
            if name.kind != "ident":
                raise PbtxtError(f"line {name.line}: expected a field name, found {name.text!r}")
            values = msg.setdefault(name.text, [])
            nxt = self.peek()
            if nxt is not None and nxt.text == ":":
                self.take()
                nxt = self.peek()
            if nxt is not None and nxt.text == "[":
                self.take()
                while True:
                    t = self.peek()
                    if t is not None and t.text == "]":
                        self.take()
                        break
                    values.append(self.value())
                    t = self.peek()
                    if t is not None and t.text == ",":
                        self.take()
            else:
                values.append(self.value())

    def value(self) -> Any:
        tok = self.take()
        if tok.text in "{<":
            return self.message("}" if tok.text == "{" else ">")
        if tok.kind == "string":
            parts = [_unquote(tok.text)]
            while (t := self.peek()) is not None and t.kind == "string":  # adjacent strings concatenate
                parts.append(_unquote(self.take().text))
            return "".join(parts)
        if tok.kind == "number":
            text = tok.text.rstrip("fF") if not tok.text.lower().startswith(("0x", "-0x", "+0x")) else tok.text
            try:
                return int(text, 0)
            except ValueError:
                return float(text)
        if tok.kind == "ident":
            if tok.text in ("true", "True"):
                return True
            if tok.text in ("false", "False"):
                return False
            return tok.text  # an enum value
        raise PbtxtError(f"line {tok.line}: expected a value, found {tok.text!r}")


def parse_pbtxt(text: str) -> PbMessage:
    """Parse text-format protobuf into {field: [values]}. Raises PbtxtError naming the line."""
    return _Parser(_tokenize(text)).message(None)
