"""`ember check model.onnx [--json]`: exit code 0 when the model will build, 1 when not."""
from __future__ import annotations

import json

import click

from .common import make_console

_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


@click.command("check")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--profile", multiple=True, metavar="DIM=MIN:OPT:MAX", help="Range of a dynamic dim (repeatable).")
@click.option("--opt-level", type=click.IntRange(0, 3), default=2, show_default=True)
@click.option("--strict", is_flag=True, help="Warnings fail the check too.")
@click.option("-v", "--verbose", is_flag=True, help="Also list info findings (ops that are safe in fp16).")
def check_cmd(model: str, as_json: bool, profile: tuple[str, ...], opt_level: int, strict: bool,
              verbose: bool) -> None:
    """Will MODEL build? Unsupported ops, dynamic dims without a profile, fp16 risks."""
    from ..tools.check import check_model, parse_profile

    report = check_model(model, parse_profile(profile), opt_level=opt_level, strict=strict)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        con = make_console()
        for f in report.findings:
            if f.severity == "info" and not verbose:
                continue
            where = f" node '{f.node}' ({f.op})" if f.node else ""
            con.print(f"[{_STYLE[f.severity]}]{f.severity}[/] [{f.category}]{where}: ", end="")
            con.print(f.message, markup=False, highlight=False)
        verdict = "[bold green]OK[/]: the model will build" if report.ok else "[bold red]FAIL[/]"
        con.print(f"{verdict} ({len(report.errors)} errors, {len(report.warnings)} warnings)")
    if not report.ok:
        raise click.exceptions.Exit(1)
