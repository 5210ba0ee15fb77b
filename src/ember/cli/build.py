"""`ember build model.onnx -o model.engine [--fp16] [--int8 --calib DATA] [--shapes ...|--min/opt/max-shapes ...]`."""
from __future__ import annotations

import os
import time
import warnings
from typing import Any

import click

from ..errors import EmberError
from .common import make_console, parse_shapes


def _profiles(mins: tuple[str, ...], opts: tuple[str, ...], maxs: tuple[str, ...]) -> list[dict]:
    """The i-th --min/--opt/--max-shapes flags form profile i (as in trtexec, one flag set per profile)."""
    if not (len(mins) == len(opts) == len(maxs)):
        raise EmberError("give --min-shapes, --opt-shapes and --max-shapes the same number of times "
                         f"(one each per profile); got {len(mins)}, {len(opts)}, {len(maxs)}")
    out = []
    for i, (lo, opt, hi) in enumerate(zip(mins, opts, maxs)):
        lo_s, opt_s, hi_s = parse_shapes([lo]), parse_shapes([opt]), parse_shapes([hi])
        if not (set(lo_s) == set(opt_s) == set(hi_s)):
            raise EmberError(f"profile {i}: --min/--opt/--max-shapes must name the same inputs")
        out.append({n: (lo_s[n], opt_s[n], hi_s[n]) for n in lo_s})
    return out


def quant_options(fn: Any) -> Any:
    """The INT8/FP8 flags (builder/quantize.py), passed to build_cmd in its ``quant`` keywords."""
    opts = [
        click.option("--int8", "quantize", flag_value="int8", help="INT8 layers from calibration data (--calib); the "
                     "others in the float precision (--fp16 for fp16)."),
        click.option("--fp8", "quantize", flag_value="fp8", help="FP8 (E4M3) layers from calibration data: per-tensor "
                     "activation and per-channel weight scales (Ada/Hopper GPUs; the CPU emulates the numerics)."),
        click.option("--calib", "calibration", metavar="DATA", help="Calibration data: a folder of .npz/.npy files "
                     "(keys: input names) or images, one .npz, or a .txt of sentences (with --tokenizer)."),
        click.option("--calib-method", type=click.Choice(["entropy", "minmax", "percentile", "mse"]), default=None,
                     help="Activation ranges: least squared error over 2048-bin histograms (int8 default), KL "
                     "entropy, 99.99th percentile, or max (fp8 default)."),
        click.option("--calib-samples", type=click.IntRange(1), default=512, show_default=True,
                     help="Calibrate on at most this many samples."),
        click.option("--calib-batch", type=click.IntRange(1), default=8, show_default=True,
                     help="Samples per calibration run."),
        click.option("--calib-cache", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Calibration cache (text): reused while the model and options are the same."),
        click.option("--calib-preprocess", metavar="SPEC", help="Images: resize=256,crop=224,scale=1/255,"
                     "mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW."),
        click.option("--tokenizer", type=click.Path(exists=True), help="Text calibration data: tokenizer.json or its "
                     "folder."),
        click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True,
                     help="Text calibration data: tokens per sentence (padded or cut)."),
        click.option("--smooth-alpha", default="auto", show_default=True, metavar="A|auto|none",
                     help="SmoothQuant for the GEMMs' activations: migrate their outlier channels into the weights "
                     "with alpha A (auto: 0.8; none: off)."),
        click.option("--accuracy-budget", default=None, metavar="X%",
                     help="Keep the layers most sensitive to quantization in floating point until the outputs are "
                     "within X (relative L2 from fp32) on held-out data."),
        click.option("--accuracy-data", metavar="DATA", help="Held-out data for --accuracy-budget [default: the "
                     "last 20% of the calibration samples]."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def quant_kwargs(q: dict[str, Any]) -> dict[str, Any]:
    """build() keywords from the INT8/FP8 flags."""
    from ..builder.quantize import CalibrationOptions

    if q["quantize"] is None:
        given = [k for k in ("calibration", "calib_cache", "accuracy_budget", "accuracy_data") if q.get(k)]
        if given:
            raise EmberError(f"--{given[0].replace('_', '-')} is for INT8/FP8 builds: add --int8 or --fp8")
        return {}
    return dict(quantize=q["quantize"], calibration=q["calibration"], calib_method=q["calib_method"],
                calib_samples=q["calib_samples"], calib_cache=q["calib_cache"], smooth_alpha=q["smooth_alpha"],
                accuracy_budget=q["accuracy_budget"],
                calib_options=CalibrationOptions(batch_size=q["calib_batch"], preprocess=q["calib_preprocess"],
                                                 tokenizer=q["tokenizer"], seq_len=q["seq_len"],
                                                 accuracy_data=q["accuracy_data"]))


@click.command("build")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Engine file to write [default: MODEL.engine].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--fp32", "precision", flag_value="fp32", default=True, help="Full fp32 (default).")
@click.option("--tf32", "precision", flag_value="tf32", help="fp32 storage, TF32 tensor-core math.")
@click.option("--fp16", "precision", flag_value="fp16", help="fp16 storage, fp32 accumulation.")
@click.option("--bf16", "precision", flag_value="bf16", help="bf16 storage, fp32 accumulation.")
@click.option("--shapes", multiple=True, metavar="NAME:DxD...", help="Static input shapes, folded at build time.")
@click.option("--min-shapes", multiple=True, metavar="NAME:DxD...", help="Smallest shapes of a dynamic profile.")
@click.option("--opt-shapes", multiple=True, metavar="NAME:DxD...", help="Shapes the profile is tuned at.")
@click.option("--max-shapes", multiple=True, metavar="NAME:DxD...", help="Largest shapes of a dynamic profile.")
@click.option("--opt-level", type=click.IntRange(0, 3), default=2, show_default=True, help="Graph optimization level.")
@click.option("--builder-level", type=click.IntRange(0, 5), default=2, show_default=True,
              help="Tuning depth: 0 takes the first vendor kernel, 5 times every candidate longest.")
@click.option("--timing-cache", default="default", show_default=True,
              help="Timing cache file; 'none' to time everything afresh.")
@click.option("--workspace", type=float, default=None, metavar="MIB",
              help="Refuse to build if the planned activation memory at the opt shapes exceeds this.")
@click.option("--rebuild-from", type=click.Path(exists=True, dir_okay=False), metavar="ENGINE",
              help="Build again with the options recorded in ENGINE (precision, shapes, profiles, levels); "
                   "MODEL must be its source ONNX. --device may differ.")
@click.option("--sign-key", type=click.Path(dir_okay=False), metavar="KEYFILE",
              help="Sign the engine (HMAC-SHA256 of its digest) with the key in KEYFILE; loads then need the key "
                   "(--verify-key).")
@click.option("--fidelity-budget", default="1e-2", show_default=True, metavar="X|none",
              help="fp16/bf16: the relative L2 distance from fp32 the engine's outputs may have on the tuning "
                   "inputs; layers that drift more are kept fp32. 'none' skips the check.")
@quant_options
@click.option("--debug", is_flag=True, help="Verify the graph after every optimization pass.")
@click.option("-v", "--verbose", is_flag=True, help="Print the optimized graph.")
def build_cmd(model: str, output: "str | None", device: str, precision: str, shapes: tuple[str, ...],
              min_shapes: tuple[str, ...], opt_shapes: tuple[str, ...], max_shapes: tuple[str, ...],
              opt_level: int, builder_level: int, timing_cache: str, workspace: "float | None",
              rebuild_from: "str | None", debug: bool, verbose: bool, sign_key: "str | None",
              fidelity_budget: str, **quant: Any) -> None:
    """Build an engine from an ONNX MODEL."""
    import ember
    from ..builder.profiles import TuningShapeWarning

    console = make_console(stderr=True)
    if rebuild_from:  # the options recorded in the engine's manifest take the place of the flags
        from ..tools.rebuild import recorded_build_args

        ctx = click.get_current_context()
        given = {p for p in ctx.params if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE}
        precision, shapes, min_shapes, opt_shapes, max_shapes, opt_level, builder_level, device = \
            recorded_build_args(rebuild_from, model, given, builder_level, device, console)
    from ..runtime.signing import load_key

    key = load_key(sign_key) if sign_key else None  # a bad key file fails before the build, not after it
    if rebuild_from and quant.get("quantize") is None:
        from ..tools.raw_manifest import read_raw_manifest

        recorded = (read_raw_manifest(rebuild_from)[0].get("quantization") or {}).get("type")
        if recorded:  # the calibration data is not in the engine: say so rather than build a float engine
            raise EmberError(f"'{rebuild_from}' is an {recorded.upper()} engine, whose calibration data it does "
                             f"not hold: add --{recorded} --calib DATA (and --calib-cache, if you kept it) to rebuild "
                             "it")
    quantization = quant_kwargs(quant)  # (a flag without --int8/--fp8 fails before the build)
    t0 = time.perf_counter()
    with BuildProgress(console) as progress, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", TuningShapeWarning)
        engine = ember.build(
            model, device=device, opt_level=opt_level, debug=debug, precision=precision,
            shapes=parse_shapes(shapes), profiles=_profiles(min_shapes, opt_shapes, max_shapes),
            builder_level=builder_level, timing_cache=None if timing_cache == "none" else timing_cache,
            workspace=workspace, fidelity_budget=fidelity_budget, progress=progress, **quantization)
    for w in said:  # the builder's warnings, said as the build's own lines (not Python's warning format)
        if issubclass(w.category, TuningShapeWarning):
            console.print(f"[yellow]note:[/] {w.message}", highlight=False)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    out = output or os.path.splitext(model)[0] + ".engine"
    size = engine.save(out, sign_key=key)
    dt = time.perf_counter() - t0
    m = engine.manifest
    if verbose:
        click.echo(str(engine.graph))
    console.print(f"[bold green]built[/] {out}  ({size / 1e6:.2f} MB, {dt:.2f} s)")
    if key is not None:
        console.print(f"  signed with the key in {sign_key}: load it with --verify-key {sign_key}", markup=False)
    console.print(f"  nodes: {m.get('nodes_in')} in the ONNX graph -> {m.get('nodes_out')} in the engine; "
                  f"device {m.get('device')}, precision {m.get('precision')}, opt level {opt_level}", markup=False)
    mem = m.get("memory") or {}
    if mem:
        console.print(f"  activation memory at opt shapes: {mem['activations_peak_mib']:.2f} MiB planned with reuse "
                      f"(one buffer per value: {mem['activations_naive_mib']:.2f} MiB); weights "
                      f"{mem['weights_mib']:.2f} MiB", markup=False)
    if m.get("tactics"):
        console.print("  tactics: " + ", ".join(f"{k} ×{v}" for k, v in sorted(m["tactics"].items())), markup=False)
    if m.get("tactic_failures"):
        console.print(f"  [yellow]{len(m['tactic_failures'])} tactic(s) failed while timing and were not chosen:[/]")
        for f in m["tactic_failures"][:8]:
            console.print("    " + f, markup=False)
    _print_precision(console, m)
    for i, p in enumerate(m.get("profiles", [])):
        console.print(f"  profile {i}: " + ", ".join(f"{n} {lo}..{hi} (opt {o})" for n, (lo, o, hi) in p.items()),
                      markup=False)
    for s in engine.inputs:
        console.print(f"  input   {s}", markup=False, highlight=False)
    for s in engine.outputs:
        console.print(f"  output  {s}", markup=False, highlight=False)


class BuildProgress:
    """A bar per build stage (compiling kernels, tuning, fidelity) naming what is worked on, under a
    line for the rest. Receives builder.progress.Progress values (plain strings also work)."""

    LABELS = {"compile": "compiling kernels", "tune": "tuning", "fidelity": "fp16/bf16 fidelity",
              "calibrate": "calibrating", "calibrate (SmoothQuant ranges)": "SmoothQuant ranges",
              "sensitivity": "layer sensitivity"}

    def __init__(self, console: Any):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, transient=True)
        self.status = self.bars.add_task("building…", total=None)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "BuildProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()

    def __call__(self, msg: str) -> None:
        stage, total = getattr(msg, "stage", None), getattr(msg, "total", 0)
        if stage is None or not total:
            self.bars.update(self.status, description=str(msg))
            return
        label = self.LABELS.get(stage, stage)
        task = self.tasks.get(stage)
        if task is None:
            task = self.tasks[stage] = self.bars.add_task(label, total=total)
        item = getattr(msg, "item", "")
        self.bars.update(task, completed=getattr(msg, "done", 0), total=total,
                         description=f"{label} {item}" if item else label)


def _print_quantization(console: Any, m: dict) -> None:
    """An INT8/FP8 engine: its calibration, the layers quantized, and those the budget kept in float."""
    q = m.get("quantization")
    if not q:
        return
    cal = q.get("calibration") or {}
    console.print(f"  {q['type']}: {q['layers']} of {q['layers_total']} layers quantized; calibration "
                  f"{cal.get('method')} "
                  f"on {cal.get('samples')} samples of {cal.get('data')}"
                  + (" (from the cache)" if cal.get("cached") else "")
                  + (f", SmoothQuant alpha {cal['smooth_alpha']}" if cal.get("smooth_alpha") is not None else ""),
                  markup=False)
    acc = q.get("accuracy")
    if acc:
        verdict = "within" if acc.get("within_budget") else "NOT within"
        console.print(f"  accuracy on {acc.get('held_out_samples')} held-out samples: {acc['error_all_quantized']:.1e} "
                      f"from fp32 with every layer quantized -> {acc['error']:.1e} as built, {verdict} the budget "
                      f"{acc['budget']:.1e} ({acc['runs']} runs, {acc['seconds']:.1f} s)", markup=False)
    for entry in q.get("kept_layers", []):
        console.print(f"    kept in {m.get('precision')}: {entry}", markup=False)


def _print_precision(console: Any, m: dict) -> None:
    """The layers a reduced-precision engine computes in fp32, by reason, and the fidelity check."""
    _print_quantization(console, m)
    layers = m.get("fp32_layers") or []
    fid = m.get("fidelity")
    if fid and ("error" in fid or "skipped" in fid):
        from rich.markup import escape

        why = f"the check failed: {fid['error']}" if "error" in fid else fid["skipped"]
        console.print(f"  [yellow]{m.get('precision')} fidelity not checked:[/] " + escape(why))
    elif fid:
        def worst(d: dict) -> float:
            return max((v if isinstance(v, (int, float)) else float("inf") for v in d.values()), default=0.0)

        verdict = "within" if fid.get("within_budget") else "NOT within"
        console.print(f"  {m.get('precision')} fidelity: output drift from fp32 {worst(fid['drift_before']):.1e} as "
                      f"converted -> {worst(fid['drift']):.1e} as built, {verdict} the budget {fid['budget']:.0e} "
                      f"({fid.get('layers_kept', 0)} layer(s) kept fp32; {fid.get('search_runs', 0)} search runs, "
                      f"{fid.get('seconds', 0):.1f} s)", markup=False)
    by_reason: dict[str, list[str]] = {}
    for entry in layers:
        reason = entry.split("): ", 1)[1].split(",", 1)[0] if "): " in entry else "op"
        by_reason.setdefault(reason, []).append(entry)
    for reason, entries in sorted(by_reason.items()):
        console.print(f"  kept in fp32 ({reason}): {len(entries)} layer(s)", markup=False)
        for e in entries[:8 if reason in ("accuracy", "speed") else 0]:
            console.print("    " + e, markup=False)
        if reason in ("accuracy", "speed") and len(entries) > 8:
            console.print(f"    … and {len(entries) - 8} more (the manifest's fp32_layers lists all)", markup=False)
