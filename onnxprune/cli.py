"""The ``onnxprune`` command: options -> API call -> printed report and exit code."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Self

import click

from . import __version__
from .analysis.registry import raise_rule_errors
from .api import prune, sensitivity
from .config import PruneConfig, ValidateConfig, parse_input_shape
from .errors import EXIT_CODES, OnnxPruneError, UsageError, flag
from .inspect import inspect_model, render_inspection
from .model import default_output_path
from .outputs import OutputGuard, write_atomic, write_text_atomic
from .recipe import applied_recipe, load_recipe, write_recipe
from .report import render
from .report_files import check_report_path, write_report
from .sensitivity import plot as plot_sensitivity
from .sensitivity import render as render_sensitivity
from .signals import COMMITTED, SIGNALS, install_raise_handlers, interrupted_message
from .validate_step import gate_error

EPILOG = "Exit codes: " + "; ".join(f"{code} {text}" for code, text in sorted(EXIT_CODES.items())) + "; 130 interrupted."


class DefaultGroup(click.Group):
    """A group whose default command is ``prune``: ``onnxprune MODEL ...`` == ``onnxprune prune MODEL ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="onnxprune")
def main() -> None:
    """Prune an ONNX model and prove what it cost.

    \b
    onnxprune model.onnx --sparsity 0.7              unstructured, 70% zeros
    onnxprune model.onnx --pattern 2:4               N:M sparsity
    onnxprune model.onnx --structured --sparsity 0.5 remove channels
    """


class _Display(logging.Handler):
    """Progress lines (onnxprune's ``logging`` records, INFO and up) on stderr with elapsed time; progress bars on a
    terminal. ``with display:`` attaches it to the ``onnxprune`` logger for one command; ``--quiet`` shows nothing."""

    def __init__(self, quiet: bool, verbose: bool):
        super().__init__(logging.INFO)
        self.quiet, self.verbose, self.start = quiet, verbose, time.perf_counter()
        self.previous: tuple[int, bool] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"[{time.perf_counter() - self.start:7.2f}s] {record.getMessage()}", err=True)

    def __enter__(self) -> Self:
        package = logging.getLogger("onnxprune")
        self.previous = (package.level, package.propagate)
        if not self.quiet:  # the lines go to stderr here only, as the command printed them before logging
            package.addHandler(self)
            package.setLevel(logging.INFO)
            package.propagate = False
        return self

    def __exit__(self, *exc_info) -> None:
        package = logging.getLogger("onnxprune")
        package.removeHandler(self)
        package.setLevel(self.previous[0])
        package.propagate = self.previous[1]

    def progress(self, items, label: str, length: int | None = None):
        if self.quiet or not sys.stderr.isatty():
            yield from items
            return
        with click.progressbar(items, label=f"  {label}", length=length, file=sys.stderr) as bar:
            yield from bar


def run_guarded(debug: bool, body) -> None:
    """Run ``body``; map errors to one line on stderr and their exit code (130 for SIGINT/SIGTERM)."""
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    raise_rule_errors(debug)  # --debug: a failing op rule stops the run with its traceback
    COMMITTED.clear()
    install_raise_handlers()
    try:
        body()
    except OnnxPruneError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"onnxprune: error: {exc.render(flag)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(interrupted_message(), err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("onnxprune: error: out of memory", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if debug:
            traceback.print_exc()
        click.echo(f"onnxprune: error: internal error (a bug in onnxprune): {type(exc).__name__}: {exc}; please "
                   "report it with the output of the same command with --debug", err=True)
        sys.exit(1)
    finally:
        raise_rule_errors(False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _guard(force: bool, model: Path, **inputs: Path | str | None) -> OutputGuard:
    """An output guard that protects the model and the other files the run reads."""
    guard = OutputGuard(force=force)
    guard.protect(model, "input model")
    for what, path in inputs.items():
        guard.protect(path, what.replace("_", " "))
    return guard


def _providers(values: tuple[str, ...]) -> list[str]:
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name:
                names.append(name if name.endswith("ExecutionProvider") else f"{name.upper()}ExecutionProvider"
                             if name.lower() in ("cpu", "cuda", "tensorrt") else name)
    fixed = {"TENSORRTExecutionProvider": "TensorrtExecutionProvider"}
    names = [fixed.get(n, n) for n in names]
    if "CPUExecutionProvider" not in names:
        names.insert(0, "CPUExecutionProvider")
    return names


@main.command("prune", epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model. [default: <stem>.pruned.onnx beside the input]")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--sparsity", type=float, help="Fraction of prunable weights (or channels, with --structured) to remove, 0 <= S < 1.")
@click.option("--threshold", type=float, help="Unstructured: zero every prunable weight with |w| <= T (instead of --sparsity).")
@click.option("--pattern", help="N:M sparsity, e.g. 2:4: zero N of every M consecutive weights along the input axis.")
@click.option("--criterion", default=None, help="Importance: l1 (default), l2, random (seeded baseline); bn (BatchNorm "
              "scale, --structured); activation (needs --calibration-data); obs (unstructured/N:M: SparseGPT-style masks and "
              "repair, needs --calibration-data); reconstruction (--structured: channels the "
              "least-squares refit can best do without; the default with --reconstruct).")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True, help="Rank within each layer/group or across the model.")
@click.option("--max-layer-sparsity", type=float, default=0.99, show_default=True, help="Global scope: cap per tensor so no layer is emptied.")
@click.option("--structured", is_flag=True, help="Remove whole channels/neurons (physically smaller, faster model).")
@click.option("--head-sparsity", type=float, default=0.0, show_default=True, help="Structured: share of attention heads to remove (--sparsity covers MLP neurons and other channels).")
@click.option("--hidden-sparsity", type=float, default=0.0, show_default=True, help="Share of the transformer residual stream's hidden size to remove, exactly rotated into its PCA basis first (needs --calibration-data; docs/structured.md).")
@click.option("--hidden-widths", type=click.Choice(["tail", "measured"]), default="tail", show_default=True, help="--hidden-sparsity on post-LN streams: the width of each segment. tail: the last two segments whole, the others narrower at the same mean width; measured: each segment cut alone on held-back calibration batches, the widths of least summed output error (slower: about 50 extra runs).")
@click.option("--target-macs", type=float, help="Structured: keep this fraction of the MACs; per-group ratios chosen from measured sensitivity. With --drop-blocks/--depth-sparsity (then an upper bound) residual blocks compete with width by measured cost per MAC saved.")
@click.option("--target-params", type=float, help="Structured: keep this fraction of the parameters (like --target-macs).")
@click.option("--uniform", is_flag=True, help="Structured: the same --sparsity in every group. Without it, with --calibration-data, per-group ratios come from measured sensitivity at the uniform plan's MACs.")
@click.option("--drop-blocks", type=int, default=0, show_default=True, help="Depth: remove N residual blocks (one x + f(x) each: a transformer layer's attention or MLP, a ResNet/MobileNetV2/ConvNeXt block), lowest block influence 1 - cos(x_in, x_out) on --calibration-data first.")
@click.option("--depth-sparsity", type=float, default=0.0, show_default=True, help="Depth: remove this share of the removable residual blocks (rounded down), like --drop-blocks.")
@click.option("--keep-tokens", type=click.Path(path_type=Path), help="Vocabulary: keep only these token ids (a text file of integers separated by whitespace, commas or newlines, or a .npy); embedding rows and LM-head columns of the others go.")
@click.option("--vocab-from-calibration", is_flag=True, help="Vocabulary: keep the token ids that occur in --calibration-data's token inputs.")
@click.option("--unknown-token", type=int, help="Vocabulary: the id that ids not kept are mapped to. [default: the model's unk_token_id metadata, else the smallest kept id]")
@click.option("--shrink-logits", is_flag=True, help="Vocabulary: logits over the kept tokens only ([.., K], the output shape changes; ids listed in the model metadata onnxprune.kept_tokens) instead of [.., V] with the removed tokens at the lowest value.")
@click.option("--round-to", type=int, default=1, show_default=True, help="Structured: keep channel counts multiples of N.")
@click.option("--fold-constants/--no-fold-constants", default=True, show_default=True, help="Structured: fold what removed channels still output (bias, BN shift) into their consumers' biases.")
@click.option("--prune-layernorm", is_flag=True, help="Structured: also remove channels normalized by a LayerNorm over the channel axis (ConvNeXt's residual stream). Approximate: the mean and variance of the kept channels change.")
@click.option("--calibration-data", type=click.Path(path_type=Path), help="Calibration inputs: .npz (input name -> array with a batch axis) or a folder of .npz/.npy files.")
@click.option("--image-size", metavar="HxW", help="Image calibration data: resize to HxW. [default: the model input's size]")
@click.option("--image-mean", default="0.485,0.456,0.406", show_default=True, help="Image calibration data: per-channel mean (after scaling to [0, 1]).")
@click.option("--image-std", default="0.229,0.224,0.225", show_default=True, help="Image calibration data: per-channel std.")
@click.option("--image-layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True, help="Image calibration data: tensor layout.")
@click.option("--image-channels", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True, help="Image calibration data: channel order.")
@click.option("--reconstruct", is_flag=True, help="Refit by least squares on the calibration data so layer outputs match the original's: structured, the layers that lost inputs; unstructured and N:M, OBS repair (see --repair); --hidden-sparsity, the layers reading the sliced stream.")
@click.option("--repair", type=click.Choice(["obs", "rowwise"]), default=None, help="Unstructured/N:M --reconstruct: obs (default: OBS/SparseGPT masks and updates, each layer keeping the row-wise refit instead where that reproduces its output better) or rowwise (the criterion's mask, each output row's kept weights refitted).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave weights/nodes whose name matches GLOB alone (repeatable).")
@click.option("--min-params", type=int, default=0, show_default=True, help="Skip weight tensors with fewer elements.")
@click.option("--prune-first/--no-prune-first", default=True, show_default=True, help="Include the first layer.")
@click.option("--prune-last/--no-prune-last", default=True, show_default=True, help="Include the last layer.")
@click.option("--include-embeddings", is_flag=True, help="Also prune embedding tables (Gather weights).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --criterion random and synthetic inputs.")
@click.option("--external-data/--no-external-data", default=None, help="Write weights to <output>.data. [default: automatic above 1.8 GB]")
@click.option("--quantize", type=click.Choice(["dynamic", "static"]), help="After pruning, quantize with onnxruntime: dynamic (int8 weights) or static (QDQ, calibrated on --data).")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Compare original and pruned in onnxruntime.")
@click.option("--providers", multiple=True, metavar="NAME[,NAME]", help="Execution providers besides CPU, e.g. cuda.")
@click.option("--data", type=click.Path(path_type=Path), help="Validation inputs: .npz mapping input names to arrays.")
@click.option("--input-shape", multiple=True, metavar="NAME:1x3x224x224", help="Shape for an input with dynamic dims (repeatable). Default: batch 1, other dims found so the model runs (README).")
@click.option("--threads", type=int, default=1, show_default=True, help="onnxruntime intra-op threads for latency.")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per model (interleaved).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed warm-up runs per model.")
@click.option("--config", "recipe_path", type=click.Path(path_type=Path), help="Recipe (YAML or JSON) with settings and per-layer overrides; options given on the command line win.")
@click.option("--save-recipe", type=click.Path(path_type=Path), help="Write the recipe this run applied (YAML or JSON), one override per layer, to replay it.")
@click.option("--report", "reports", multiple=True, type=click.Path(path_type=Path), help="Write the report to a .json, .md or .html file (repeatable).")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Labelled data (.npz: inputs + 'labels'): report top-1/top-5 of original and pruned.")
@click.option("--max-accuracy-drop", type=float, help="Gate: fail (exit 6) if top-1 drops by more than X percentage points (needs --eval-data).")
@click.option("--min-cosine", type=float, help="Gate: fail (exit 6) if any output's cosine similarity is lower.")
@click.option("--max-rel-l2", type=float, help="Gate: fail (exit 6) if any output's relative L2 error is higher.")
@click.option("--min-top1", type=float, help="Gate: fail (exit 6) if top-1 agreement is lower.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="List every tensor/group in the summary.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--low-memory", is_flag=True, help="Memory before time, the same results: freed memory goes back to the system at once (glibc mmap threshold fixed at 1 MiB), consumer captures run in 16 MiB pieces, the allocation's probe and the channel selection in windows of groups on one thread, each window keeping the activations its successor starts from only within half of one layer's over the calibration data, and the --reconstruct refit keeps about three quarters of one layer's input between its waves, recomputing what does not fit, and runs a few samples at a time where samples are independent (an 86 MB encoder: ~420 MB instead of ~0.7-1.0 GB; ResNet-50: 0.76 instead of 1.9 GB; for 30-75 % more time; docs/benchmarks.md).")
def prune_command(model: Path, output: Path | None, force: bool, debug: bool, quiet: bool, verbose: bool,
                  reports: tuple[Path, ...], low_memory: bool, **opts) -> None:
    """Prune MODEL and validate the result (the default command)."""

    click_ctx = click.get_current_context()

    def body() -> None:
        settings = _settings(opts)
        if opts["recipe_path"]:
            for key, value in load_recipe(opts["recipe_path"]).items():
                source = click_ctx.get_parameter_source(key)
                if key not in settings or source != click.core.ParameterSource.COMMANDLINE:
                    settings[key] = value
        config = PruneConfig(**settings).validate()
        if opts["threads"] < 1 or opts["runs"] < 1 or opts["warmup"] < 0:
            raise UsageError("--threads and --runs must be >= 1, --warmup >= 0")
        shapes = dict(parse_input_shape(spec) for spec in opts["input_shape"])
        vcfg = ValidateConfig(
            enabled=opts["validate"], providers=_providers(opts["providers"]),
            data=str(opts["data"]) if opts["data"] else None, input_shapes=shapes, threads=opts["threads"],
            warmup=opts["warmup"], runs=opts["runs"], seed=opts["seed"], min_cosine=opts["min_cosine"],
            max_rel_l2=opts["max_rel_l2"], min_top1=opts["min_top1"],
            eval_data=str(opts["eval_data"]) if opts["eval_data"] else None,
            max_accuracy_drop=opts["max_accuracy_drop"],
        )
        if vcfg.max_accuracy_drop is not None and not vcfg.eval_data:
            raise UsageError("--max-accuracy-drop needs --eval-data")
        if vcfg.eval_data and not vcfg.enabled:
            raise UsageError("--eval-data needs validation (drop --no-validate)")
        out = output or default_output_path(model)
        guard = _guard(force, model, data_file=opts["data"], eval_data_file=opts["eval_data"],
                       calibration_data=opts["calibration_data"], recipe=opts["recipe_path"],
                       token_file=config.keep_tokens)
        guard.claim(out, "output")
        if opts["external_data"]:
            guard.claim(out.with_name(f"{out.name}.data"), "output data file")
        for path in reports:
            check_report_path(path)
            guard.claim(path, "report")
        if opts["save_recipe"]:
            guard.claim(opts["save_recipe"], "recipe")
        display = _Display(quiet, verbose)
        with display:
            _, result = prune(model, out, config=config, validate=vcfg, force=force, quantize=opts["quantize"],
                              external_data=opts["external_data"], progress=display.progress, outputs=guard,
                              low_memory=low_memory)  # memory before time (onnxprune/heap.py)
        report = result.to_dict()
        for path in reports:
            write_report(report, path)
        if opts["save_recipe"]:
            write_recipe(applied_recipe(report), opts["save_recipe"])
        if not quiet:
            click.echo(render(report, verbose=verbose))
        error = gate_error(result)  # exit 6, or 8 when the models could not be compared
        if error is not None:
            raise error

    run_guarded(debug, body)


def _settings(opts: dict) -> dict:
    """The :class:`PruneConfig` fields given as command options (same names), converted to the config's types."""
    convert = {"exclude": list, "image_size": _hw, "image_mean": lambda v: _floats(v, "--image-mean"),
               "image_std": lambda v: _floats(v, "--image-std"), "calibration_data": lambda v: str(v) if v else None,
               "keep_tokens": lambda v: str(v) if v else None}
    return {f.name: convert.get(f.name, lambda v: v)(opts[f.name]) for f in fields(PruneConfig) if f.name in opts}


def _hw(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise UsageError(f"--image-size must be HxW such as 224x224, got {value!r}") from None
    return h, w


def _floats(value: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"{option} must be numbers separated by commas, got {value!r}") from None


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


@main.command("inspect", epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
@click.option("--input-shape", multiple=True, metavar="NAME:1x3x224x224", help="Shape for dynamic inputs (for MACs and groups); default: found as prune finds it.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect_command(model: Path, as_json: bool, input_shape: tuple[str, ...], debug: bool) -> None:
    """Describe MODEL without changing it: prunable weights, groups, params, MACs."""

    def body() -> None:
        shapes = dict(parse_input_shape(spec) for spec in input_shape)
        info = inspect_model(model, shapes)
        click.echo(_dump(info) if as_json else render_inspection(info))

    run_guarded(debug, body)


@main.command("sensitivity", epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calibration-data", type=click.Path(path_type=Path), help="Inputs to measure on (.npz or folder); default: synthetic.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Labelled .npz (inputs + 'labels'): also report top-1.")
@click.option("--ratios", default="0.25,0.5,0.75", show_default=True, help="Shares of each group's channels to remove.")
@click.option("--criterion", default="l1", show_default=True, help="Which channels go first: l1, l2, bn, random.")
@click.option("--input-shape", multiple=True, metavar="NAME:1x3x224x224", help="Shape for dynamic inputs.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the measurements as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG plot of error against ratio per group.")
@click.option("--force", is_flag=True, help="Replace existing --json/--plot files.")
@click.option("--prune-layernorm", is_flag=True, help="As for pruning: let channels through LayerNorm over channels.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def sensitivity_command(model: Path, calibration_data: Path | None, eval_data: Path | None, ratios: str,
                        criterion: str, input_shape: tuple[str, ...], json_path: Path | None, plot: Path | None,
                        force: bool, prune_layernorm: bool, quiet: bool, debug: bool) -> None:
    """Prune each channel group of MODEL alone at several ratios and measure what it costs."""

    def body() -> None:
        try:
            values = tuple(float(r) for r in ratios.split(","))
        except ValueError:
            raise UsageError(f"--ratios must be numbers separated by commas, got {ratios!r}") from None
        if not values or any(not 0 < r < 1 for r in values):
            raise UsageError("--ratios must lie in (0, 1)")
        config = PruneConfig(structured=True, sparsity=0.0, criterion=criterion,
                             prune_layernorm=prune_layernorm).validate()
        guard = _guard(force, model, calibration_data=calibration_data, eval_data_file=eval_data)
        if json_path:
            guard.claim(json_path, "JSON file")
        if plot:
            if not plot.suffix:
                raise UsageError(f"--plot {plot}: give the file an image extension such as .png")
            guard.claim(plot, "plot")
        shapes = dict(parse_input_shape(spec) for spec in input_shape)
        with _Display(quiet, False):
            result = sensitivity(model, config=config, ratios=values, calibration_data=calibration_data,
                                 eval_data=eval_data, input_shapes=shapes, outputs=guard)
        if json_path:
            write_text_atomic(json_path, _dump(result) + "\n", "JSON file")
        if plot:
            write_atomic(plot, "plot", lambda temp: plot_sensitivity(result, str(temp)))
        if not quiet:
            click.echo(render_sensitivity(result))

    run_guarded(debug, body)
