"""ember's intermediate representation: numpy only."""
from .dtypes import DType, from_numpy, to_numpy
from .graph import Graph, Node, Value
from .printer import format_graph
from .shapes import Dim, Sym, broadcast_shapes, is_static, parse_dim, shape_str
from .verify import verify

__all__ = ["DType", "Dim", "Graph", "Node", "Sym", "Value", "broadcast_shapes", "format_graph",
           "from_numpy", "is_static", "parse_dim", "shape_str", "to_numpy", "verify"]
