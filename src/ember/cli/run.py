"""`ember run model.engine --input x=file.npy --save out.npz`."""
from __future__ import annotations

import time

import click
import numpy as np
from rich.table import Table

from .common import load_engine_or_model, make_console, make_feeds, parse_shapes, summarize


@click.command("run")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=FILE.npy|NAME=random|FILE.npz",
              help="An input (repeatable). Inputs not given are random.")
@click.option("--shapes", multiple=True, metavar="NAME:DxDxD", help="Shapes of random inputs with dynamic dims.")
@click.option("--save", type=click.Path(dir_okay=False), help="Save the outputs to an .npz keyed by output name.")
@click.option("--save-inputs", type=click.Path(dir_okay=False), help="Save the inputs used to an .npz.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", default=0, show_default=True, help="Seed of random inputs.")
@click.option("--allow-fallback", is_flag=True,
              help="Run layers whose built kernels cannot run here with the reference kernels (listed).")
@click.option("--verify-key", type=click.Path(dir_okay=False), metavar="KEYFILE",
              help="Load the engine only if it is signed with the key in KEYFILE (ember build --sign-key).")
def run_cmd(model: str, inputs: tuple[str, ...], shapes: tuple[str, ...], save: "str | None",
            save_inputs: "str | None", device: str, seed: int, allow_fallback: bool, verify_key: "str | None") -> None:
    """Run an engine (or an ONNX model, built in memory) and summarize each output."""
    console = make_console()
    engine = load_engine_or_model(model, device=device, verify_key=verify_key, allow_fallback=allow_fallback)
    feeds = make_feeds(engine, inputs, parse_shapes(shapes), seed)
    t0 = time.perf_counter()
    outs = engine.run(feeds)
    dt = time.perf_counter() - t0
    table = Table(title=f"{model} on {engine.device} ({dt * 1e3:.1f} ms)", title_justify="left")
    for col in ("output", "dtype", "shape", "min", "max", "mean", "first values"):
        table.add_column(col)
    for name, value in outs.items():
        if isinstance(value, np.ndarray) or np.isscalar(value):
            table.add_row(*summarize(name, value))
        else:
            table.add_row(name, type(value).__name__, "", "", "", "", "")
    console.print(table)
    if save_inputs:
        np.savez(save_inputs, **feeds)
    if save:
        np.savez(save, **{k: v for k, v in outs.items() if isinstance(v, np.ndarray)})
        console.print(f"saved outputs to {save}")
