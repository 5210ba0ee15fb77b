"""`ember build model.onnx -o model.engine`."""
from __future__ import annotations

import os
import time

import click
from rich.console import Console


@click.command("build")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Engine file to write [default: MODEL.engine].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--opt-level", type=click.IntRange(0, 3), default=2, show_default=True, help="Graph optimization level.")
@click.option("--debug", is_flag=True, help="Verify the graph after every optimization pass.")
@click.option("-v", "--verbose", is_flag=True, help="Print the optimized graph.")
def build_cmd(model: str, output: "str | None", device: str, opt_level: int, debug: bool, verbose: bool) -> None:
    """Build an engine from an ONNX MODEL."""
    import ember

    console = Console(stderr=True)
    t0 = time.perf_counter()
    engine = ember.build(model, device=device, opt_level=opt_level, debug=debug)
    out = output or os.path.splitext(model)[0] + ".engine"
    size = engine.save(out)
    dt = time.perf_counter() - t0
    m = engine.manifest
    if verbose:
        click.echo(str(engine.graph))
    console.print(f"[bold green]built[/] {out}  ({size / 1e6:.2f} MB, {dt:.2f} s)")
    console.print(f"  nodes: {m.get('nodes_in')} in the ONNX graph -> {m.get('nodes_out')} in the engine; "
                  f"device {m.get('device')}, precision {m.get('precision')}, opt level {opt_level}")
    for s in engine.inputs:
        console.print(f"  input   {s}", markup=False, highlight=False)
    for s in engine.outputs:
        console.print(f"  output  {s}", markup=False, highlight=False)
