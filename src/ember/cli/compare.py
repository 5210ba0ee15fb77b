"""`ember compare model.onnx [model.engine] --atol --rtol --error-stat ... [--all-layers]`."""
from __future__ import annotations

import json

import click
from rich.table import Table

from ..tools.compare import ERROR_STATS
from .common import make_console


def _dims(items: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for it in items:
        name, sep, val = it.partition("=")
        if not sep or not val.isdigit():
            raise click.BadParameter(f"'{it}': write DIM=VALUE, e.g. batch=2")
        out[name] = int(val)
    return out


def _model_inputs(proto) -> dict[str, str]:
    """The graph inputs of an ONNX model that are not initializers, shown as 'name: dtype[dims]'."""
    from onnx import helper

    inits = {t.name for t in proto.graph.initializer}
    out = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else "?"
        except (KeyError, ValueError):
            dtype = "?"
        dims = ",".join(d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tt.shape.dim)
        out[vi.name] = f"{vi.name}: {dtype}[{dims}]" if tt.HasField("shape") else f"{vi.name}: {dtype}"
    return out


@click.command("compare")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("engine", required=False, type=click.Path(dir_okay=False))
@click.option("--atol", default=1e-4, show_default=True, type=float)
@click.option("--rtol", default=1e-3, show_default=True, type=float)
@click.option("--error-stat", type=click.Choice(ERROR_STATS), default="elemwise", show_default=True)
@click.option("--quantile", default=0.99, show_default=True, type=float, help="For --error-stat quantile.")
@click.option("--all-layers", is_flag=True, help="Compare every intermediate tensor; name the first divergent node.")
@click.option("-i", "--input", "inputs", multiple=True, metavar="[NAME=]FILE.npy|FILE.npz",
              help="Given inputs (a bare FILE.npy for a model with one input); the rest are random.")
@click.option("--dim", "dims", multiple=True, metavar="DIM=VALUE", help="Value of a dynamic dim for random inputs.")
@click.option("--opt-level", type=click.IntRange(0, 3), default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def compare_cmd(model: str, engine: "str | None", atol: float, rtol: float, error_stat: str, quantile: float,
                all_layers: bool, inputs: tuple[str, ...], dims: tuple[str, ...], opt_level: int, seed: int,
                as_json: bool) -> None:
    """Run ember (MODEL built here, or ENGINE) and ONNX Runtime on the same inputs; exit 1 on mismatch."""
    from ..frontend.onnx import load_model
    from ..tools.compare import compare_models
    from .common import read_inputs

    proto, _ = load_model(model)  # loaded once: its input names bind the --input files
    r = compare_models(proto, engine, atol=atol, rtol=rtol, error_stat=error_stat, quantile=quantile,
                       inputs=read_inputs(inputs, _model_inputs(proto)), dims=_dims(dims), seed=seed,
                       all_layers=all_layers, opt_level=opt_level)
    r.source = model
    if as_json:
        click.echo(json.dumps(r.to_json(), indent=2))
    else:
        con = make_console()
        t = Table(title=f"ember vs ONNX Runtime ({error_stat}, atol {atol:g}, rtol {rtol:g})", title_justify="left")
        for col in ("output", "shape", "max abs", "mean abs", "max rel", "mean rel", "cosine", "result"):
            t.add_column(col)
        for d in r.outputs:
            t.add_row(d.name, "x".join(map(str, d.shape)), f"{d.max_abs:.3g}", f"{d.mean_abs:.3g}", f"{d.max_rel:.3g}",
                      f"{d.mean_rel:.3g}", f"{d.cosine:.6f}", "[green]PASS[/]" if d.passed else "[red]FAIL[/]")
        con.print(t)
        if all_layers:
            con.print(f"{len(r.layers)} intermediate tensors compared")
            fd = r.first_divergent
            if fd is None:
                con.print("[green]no layer diverges beyond tolerance[/]")
            else:
                con.print(f"[red]first divergent node[/]: '{fd['node']}' ({fd['op']}), tensor '{fd['tensor']}': "
                          f"max abs {fd['max_abs']:.3g}, cosine {fd['cosine']:.6f}", highlight=False)
                if fd["fused_upstream"]:
                    con.print("  not comparable upstream (fused by ember): " + ", ".join(fd["fused_upstream"]),
                              markup=False)
        con.print("[bold green]PASSED[/]" if r.passed else "[bold red]FAILED[/]")
    if not r.passed:
        raise click.exceptions.Exit(1)
