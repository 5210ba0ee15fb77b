"""`ember perf MODEL`: measure a running server at several concurrency levels (like perf_analyzer)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import click


@click.command("perf")
@click.argument("model")
@click.option("-u", "--url", default=None, help="Server address [default: 127.0.0.1:8000 for http, :8001 for grpc].")
@click.option("-i", "--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option("-x", "--model-version", default="", help="Model version [default: the server's latest].")
@click.option("--concurrency-range", default="1:8:1", show_default=True,
              help="start:end:step (additive, as perf_analyzer) or a list like 1,4,16,64.")
@click.option("-b", "--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--shape", "shapes", multiple=True, metavar="NAME:D,D,...",
              help="Shape to send for an input with variable dims the model's config and warm-up do not fix: "
                   "the whole request shape, or without the batch dim for a batching model.")
@click.option("--duration", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Measured seconds per concurrency level.")
@click.option("--warmup", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Unmeasured seconds before each level.")
@click.option("--json-data", is_flag=True, help="HTTP: send JSON tensors instead of binary ones.")
@click.option("-f", "--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the results as CSV.")
@click.option("--auth-token-file", type=click.Path(exists=True, dir_okay=False),
              help="Bearer token file (or set EMBER_SERVE_TOKEN).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Per-request timeout, seconds.")
@click.option("--processes", type=click.IntRange(1), default=None,
              help="Client processes sharing the connections [default: half the CPUs, at most the concurrency].")
def perf_cmd(model: str, url: "str | None", protocol: str, model_version: str, concurrency_range: str,
             batch_size: int, shapes: "tuple[str, ...]", duration: float, warmup: float, json_data: bool,
             csv_path: "str | None", auth_token_file: "str | None", timeout: float, processes: "int | None") -> None:
    """Load-test MODEL on a running `ember serve` (or Triton) server: throughput and p50/p90/p99 latency."""
    from ember.serve.perf import PerfTarget, parse_range, parse_shapes, sweep, write_csv

    token = Path(auth_token_file).read_text().strip() if auth_token_file else os.environ.get("EMBER_SERVE_TOKEN")
    target = PerfTarget(url or ("127.0.0.1:8001" if protocol == "grpc" else "127.0.0.1:8000"), model, model_version,
                        protocol, batch_size, parse_shapes(shapes), not json_data, token or None, timeout, processes)
    levels = parse_range(concurrency_range)
    click.echo(f"{model} over {protocol} at {target.url}: batch {batch_size}, {duration:g} s per level")
    click.echo(f"{'concurrency':>11} {'infer/s':>10} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'avg ms':>9} "
               f"{'requests':>9} {'failed':>7} {'client cpu':>10}")

    def show(r) -> None:
        fmt = lambda v: f"{v:9.2f}" if not math.isnan(v) else f"{'-':>9}"  # noqa: E731
        click.echo(f"{r.concurrency:>11} {r.throughput:>10.1f} {fmt(r.p50_ms)} {fmt(r.p90_ms)} {fmt(r.p99_ms)} "
                   f"{fmt(r.avg_ms)} {r.requests:>9} {r.failures:>7} {r.client_cpu:>10.2f}")
        for reason, n in sorted(r.errors.items()):
            click.echo(f"{'':>11}   {n} failed: {reason}")
        if r.client_saturated:
            click.echo(f"{'':>11}   warning: the client may be the bottleneck: its busiest of {r.processes} "
                       f"process(es) used {r.client_busiest:.0%} of a core, all together {r.client_cpu:.2f} cores; "
                       "add --processes, or run ember perf on another machine")

    results = sweep(target, levels, duration, warmup, on_result=show)
    if csv_path:
        write_csv(csv_path, results)
        click.echo(f"wrote {csv_path}")
    if any(r.failures for r in results):
        raise click.exceptions.Exit(1)
