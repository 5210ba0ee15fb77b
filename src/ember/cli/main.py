"""The `ember` command. Each subcommand lives in its own module and is imported only when used."""
from __future__ import annotations

import importlib
import sys

import click

# name -> "module:attribute" of a click command; imported lazily so `ember --help` stays fast.
COMMANDS: dict[str, str] = {
    "build": "ember.cli.build:build_cmd",
    "run": "ember.cli.run:run_cmd",
    "inspect": "ember.cli.inspect:inspect_cmd",
    "check": "ember.cli.check:check_cmd",
    "compare": "ember.cli.compare:compare_cmd",
    "simplify": "ember.cli.simplify:simplify_cmd",
    "bench": "ember.cli.bench:bench_cmd",
    "serve": "ember.cli.serve:serve_cmd",
    "perf": "ember.cli.perf:perf_cmd",
    "doctor": "ember.cli.doctor:doctor_cmd",
    "llm": "ember.cli.llm:llm_group",
    "generate": "ember.cli.llm:generate_cmd",
}

_HELP = {
    "build": "Build an engine from an ONNX model.",
    "run": "Run an engine (or ONNX model) on inputs and print/save outputs.",
    "inspect": "Show inputs, outputs and layers of a model or engine.",
    "check": "Check whether a model will build, and what is at risk.",
    "compare": "Compare ember against ONNX Runtime on the same inputs.",
    "simplify": "Write the optimized graph back to ONNX.",
    "bench": "Measure throughput and latency of an engine.",
    "serve": "Serve a model repository over HTTP and gRPC (KServe v2).",
    "perf": "Load-test a running server at several concurrency levels.",
    "doctor": "Explain the environment: versions, devices, mismatches.",
    "llm": "LLM engines: build one from a Hugging Face checkpoint or a GGUF file.",
    "generate": "Stream a completion from an LLM engine or checkpoint.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if _available(n))

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS or not _available(name):
            return None
        mod, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(mod), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, _HELP.get(n, "")) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _available(name: str) -> bool:
    mod = COMMANDS[name].split(":")[0]
    return importlib.util.find_spec(mod) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ember")
def cli() -> None:
    """ember: build, run, measure and serve fast inference engines."""


def main(argv: "list[str] | None" = None) -> int:
    from ..errors import EmberError

    try:
        rv = cli.main(args=argv, standalone_mode=False)
    except EmberError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
