"""`ember simplify model.onnx -o out.onnx`."""
from __future__ import annotations

import json
import os

import click

from .common import make_console


@click.command("simplify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="ONNX file to write [default: MODEL.sim.onnx].")
@click.option("--opt-level", type=click.IntRange(0, 3), default=2, show_default=True)
@click.option("--opset", type=click.IntRange(1), default=None,
              help="ONNX opset of the output [default: the input's]. A newer one keeps more fused ops (Attention, Gelu).")
@click.option("--no-check", is_flag=True, help="Do not run both models in ONNX Runtime to confirm they agree.")
@click.option("--json", "as_json", is_flag=True)
def simplify_cmd(model: str, output: "str | None", opt_level: int, opset: "int | None", no_check: bool,
                 as_json: bool) -> None:
    """Write the optimized graph of MODEL back to ONNX, at its opset and never with more nodes."""
    from ..tools.simplify import WROTE_INPUT, simplify_model

    out = output or os.path.splitext(model)[0] + ".sim.onnx"
    r = simplify_model(model, out, opt_level=opt_level, check=not no_check, opset=opset)
    if as_json:
        click.echo(json.dumps(r.to_json(), indent=2))
    else:
        con = make_console()
        con.print(f"[bold green]wrote[/] {out}: {r.nodes_in} -> {r.nodes_out} nodes, opset {r.opset_out} "
                  f"({r.wrote})")
        for note in r.notes:
            con.print(f"  {note}", markup=False, highlight=False)
        if r.notes:
            what = "the input is written unchanged" if r.wrote == WROTE_INPUT else f"{r.wrote} is written"
            con.print(f"  so {what}; --opset N writes a newer opset, where more fused ops exist", markup=False)
        gone = sorted(set(r.op_counts_in) - set(r.op_counts_out))
        if gone:
            con.print("  ops gone: " + ", ".join(gone), markup=False)
        if r.check is not None:
            worst = max((d.max_abs for d in r.check), default=0.0)
            con.print(f"  ONNX Runtime: outputs {'agree' if r.passed else '[red]DIFFER[/]'} (max abs diff {worst:.3g})")
    if not r.passed:
        raise click.exceptions.Exit(1)
