"""ember's intermediate representation: numpy only."""
from .dtypes import DType, from_numpy, to_numpy
from .graph import Graph, Node, Value
from .printer import format_graph
from .shapes import Dim, Sym, broadcast_shapes, floordiv, is_static, mod, shape_str, sym_max, sym_min
from .verify import verify

__all__ = ["DType", "Dim", "Graph", "Node", "Sym", "Value", "broadcast_shapes", "floordiv", "format_graph",
           "from_numpy", "is_static", "mod", "shape_str", "sym_max", "sym_min", "to_numpy", "verify"]
