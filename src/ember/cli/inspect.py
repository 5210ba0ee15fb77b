"""`ember inspect model.onnx|model.engine [--json]`."""
from __future__ import annotations

import json

import click
from rich.table import Table

from .common import make_console


def _shape(v) -> str:
    if v is None:
        return "_"
    dims = "?" if v["shape"] is None else "[" + ",".join(str(d) for d in v["shape"]) + "]"
    return f"{v['dtype'] or '?'}{dims}"


def _tactic(row) -> str:
    """The layer's tactic, or its choice per shape bucket: ``batch<=1: a; <=8: b; <=64+: c``."""
    rec = row.get("tactic_buckets")
    if not rec:
        return row["tactic"] or ""
    last = len(rec["buckets"]) - 1
    return rec["symbol"] + "; ".join(f"<={b['upto']}{'+' if i == last else ''}: {b['tactic']}"
                                     for i, b in enumerate(rec["buckets"]))


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (nodes_in, nodes_out, layers, ...).")
@click.option("--opt-level", type=click.IntRange(0, 3), default=2, show_default=True,
              help="Optimization level for an ONNX model (an engine shows what it was built with).")
def inspect_cmd(model: str, as_json: bool, opt_level: int) -> None:
    """Show inputs, outputs and layers of an ONNX MODEL (optimized here) or an engine."""
    from ..tools.inspect import inspect_model

    info = inspect_model(model, opt_level=opt_level)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    con = make_console()
    con.print(f"[bold]{info['source']}[/] ({info['kind']}, opt level {info['opt_level']})")
    for v in info["inputs"]:
        con.print(f"  input   {v['name']}: {_shape(v)}", markup=False, highlight=False)
    for v in info["outputs"]:
        con.print(f"  output  {v['name']}: {_shape(v)}", markup=False, highlight=False)
    t = Table(title="layers", title_justify="left")
    for col in ("#", "name", "op", "outputs", "group", "epilogue", "tactic"):
        t.add_column(col)
    for i, r in enumerate(info["layers"]):
        t.add_row(str(i), r["name"], r["op"], ", ".join(_shape(o) for o in r["outputs"]), r["group"] or "",
                  "+".join(r["epilogue"]), _tactic(r))
    con.print(t)
    con.print(f"nodes: {info['nodes_in']} in the ONNX graph -> {info['nodes_out']} after optimization "
              f"({info['ir_nodes_out']} IR nodes, {info['fusion_groups']} fusion groups, {info['anchors']} anchors)")
    plan = info.get("cuda_graph")
    if plan:
        from ..tools.plan_report import describe

        shapes = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in plan["shapes"].items())
        con.print(f"on a GPU, at {shapes} ({plan['shapes_from']}): {describe(plan)}", markup=False, highlight=False)
        if plan.get("value_inputs"):
            con.print(f"  inputs whose values key the plan (one plan per value): {', '.join(plan['value_inputs'])}",
                      markup=False)
