"""Record (or check) the sha256 of every output model and normalised JSON report, fixture x mode.

    python bench/record_outputs.py --write tests/baselines/outputs.json   # record on the current commit
    python bench/record_outputs.py --check tests/baselines/outputs.json   # compare; lists every difference

A refactor that must not change behaviour keeps every recorded hash (docs/testing.md). Each case runs the
``onnxprune`` command in this process (``--runs 2 --warmup 0``, validation on, one thread) and records its exit
code, the sha256 of the output model, of its external data file when there is one, and of the JSON report after
:func:`normalise` removed what depends on the host or the clock (the fields named in ``TIMING_KEYS``, latency
notes) and replaced the temporary folder and the repository root by placeholders. ``--only SUBSTRING`` runs
the matching cases (with ``--check``: the others are not compared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(ROOT))

#: report keys whose values are wall-clock measurements: removed wherever they occur
TIMING_KEYS = frozenset({"timings", "seconds", "latency", "stages"})
#: report lists of notes: a note about latency quotes a measured speedup, so only its first words are kept
LATENCY_NOTE = "latency on "

UNSTRUCTURED = ["cnn.onnx", "cnn_opset11.onnx", "cnn_constant_weights.onnx", "mlp_gemm.onnx", "mlp_matmul.onnx",
                "shared_weight.onnx", "embedding.onnx", "trained/digits_mlp.onnx", "trained/digits_transformer.onnx",
                "transformers/bert_ts.onnx", "recurrent/lstm_bidirectional.onnx", "recurrent/gru_forward.onnx",
                "recurrent/loop_mlp.onnx", "quirks/if_subgraph.onnx", "quirks/float16.onnx",
                "quirks/weight_paths.onnx", "int32/paddle_cls.onnx"]
STRUCTURED = ["cnn.onnx", "cnn_opset21.onnx", "mlp_gemm.onnx", "mlp_matmul.onnx", "mlp_dynamic.onnx",
              *(f"structured/{p.name}" for p in sorted((FIXTURES / "structured").glob("*.onnx"))),
              "trained/digits_cnn.onnx", "trained/digits_mlp.onnx", "int32/paddle_cls.onnx",
              "feeds/detector32.onnx", "feeds/samplerate.onnx", "recurrent/if_conv.onnx",
              "recurrent/rnn_bidirectional_gemm.onnx", "quirks/weight_paths.onnx"]
HEADS = ["transformers/bert_ts.onnx", "transformers/gpt2_ts.onnx", "transformers/llama_ts.onnx",
         "transformers/vit_ts.onnx", "transformers/distilbert_ts.onnx", "int32/paddle_heads.onnx",
         "trained/digits_transformer.onnx"]
TRAINED_CALIB = {"trained/digits_cnn.onnx": "trained/digits_calib.npz",
                 "trained/digits_mlp.onnx": "trained/digits_calib.npz",
                 "trained/digits_transformer.onnx": "trained/digits_seq_calib.npz"}


def cases(data: Path) -> list[tuple[str, str, list[str]]]:
    """Every (fixture, mode name, options) recorded."""
    calib = {**{k: str(FIXTURES / v) for k, v in TRAINED_CALIB.items()}, "cnn.onnx": str(data / "cnn.npz")}
    out: list[tuple[str, str, list[str]]] = []
    for fixture in UNSTRUCTURED:
        out += [(fixture, "sparsity0.7", ["--sparsity", "0.7"]), (fixture, "pattern2:4", ["--pattern", "2:4"])]
    out.append(("cnn.onnx", "global0.7", ["--sparsity", "0.7", "--scope", "global"]))
    out.append(("cnn.onnx", "threshold", ["--threshold", "0.05"]))
    for fixture in STRUCTURED:
        out.append((fixture, "structured0.5", ["--structured", "--sparsity", "0.5"]))
    for fixture in ["cnn.onnx", "structured/residual.onnx", "structured/concat_skip.onnx", "trained/digits_cnn.onnx"]:
        for criterion in ("l2", "bn", "random"):
            out.append((fixture, f"structured-{criterion}", ["--structured", "--sparsity", "0.5", "--criterion",
                                                            criterion, "--seed", "3"]))
    out.append(("cnn.onnx", "structured-global", ["--structured", "--sparsity", "0.5", "--scope", "global"]))
    out.append(("cnn.onnx", "structured-round4-nofold", ["--structured", "--sparsity", "0.5", "--round-to", "4",
                                                         "--no-fold-constants"]))
    out.append(("structured/layernorm.onnx", "structured-layernorm", ["--structured", "--sparsity", "0.5",
                                                                       "--prune-layernorm"]))
    for fixture, path in calib.items():
        cal = ["--calibration-data", path]
        out.append((fixture, "structured-activation", ["--structured", "--sparsity", "0.5", "--criterion",
                                                       "activation", *cal]))
        out.append((fixture, "structured-reconstruct", ["--structured", "--sparsity", "0.5", "--reconstruct", *cal]))
        out.append((fixture, "structured-l1-reconstruct", ["--structured", "--sparsity", "0.5", "--reconstruct",
                                                           "--criterion", "l1", *cal]))
        out.append((fixture, "sparsity0.5-reconstruct", ["--sparsity", "0.5", "--reconstruct", *cal]))
        out.append((fixture, "sparsity0.5-obs", ["--sparsity", "0.5", "--criterion", "obs", *cal]))
        out.append((fixture, "pattern2:4-obs", ["--pattern", "2:4", "--criterion", "obs", *cal]))
        out.append((fixture, "target-macs0.6-calib", ["--structured", "--target-macs", "0.6", *cal]))
    for fixture in HEADS:
        out.append((fixture, "heads0.25", ["--structured", "--sparsity", "0.5", "--head-sparsity", "0.25"]))
    out.append(("cnn.onnx", "target-macs0.6", ["--structured", "--target-macs", "0.6"]))
    out.append(("cnn.onnx", "target-params0.5", ["--structured", "--target-params", "0.5"]))
    out.append(("cnn.onnx", "eval-data", ["--sparsity", "0.5", "--eval-data", str(data / "cnn_eval.npz")]))
    out.append(("cnn.onnx", "data", ["--structured", "--sparsity", "0.5", "--data", str(data / "cnn.npz")]))
    out.append(("mlp_dynamic.onnx", "input-shape", ["--sparsity", "0.5", "--input-shape", "input:2x5x32"]))
    out.append(("feeds/detector32.onnx", "sparsity0.5", ["--sparsity", "0.5"]))
    for mode in ("dynamic", "static"):
        out.append(("cnn.onnx", f"quantize-{mode}", ["--sparsity", "0.2", "--quantize", mode, "--data",
                                                      str(data / "cnn.npz")]))
        out.append(("cnn.onnx", f"structured-quantize-{mode}", ["--structured", "--sparsity", "0.1", "--quantize",
                                                                 mode, "--data", str(data / "cnn.npz")]))
    return out


def normalise(value: Any, replace: dict[str, str]) -> Any:
    """The report without timing fields and latency figures, host paths replaced by placeholders."""
    if isinstance(value, dict):
        return {k: normalise(v, replace) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [normalise(v, replace) for v in value]
    if isinstance(value, str):
        if value.startswith(LATENCY_NOTE):
            return value.split(":", 1)[0]
        for old, new in replace.items():
            value = value.replace(old, new)
    return value


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def run_case(fixture: str, options: list[str], work: Path) -> dict[str, Any]:
    """Run one case in a fresh folder; its exit code and the hashes of what it wrote."""
    from click.testing import CliRunner

    from onnxprune.cli import main

    folder = work / "case"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    out, report = folder / "out.onnx", folder / "report.json"
    args = ["prune", str(FIXTURES / fixture), "-o", str(out), "--report", str(report), "--runs", "2",
            "--warmup", "0", "--threads", "1", "-q", *options]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    record: dict[str, Any] = {"exit": result.exit_code, "model": _sha(out), "data": _sha(folder / "out.onnx.data")}
    if report.exists():
        text = json.loads(report.read_text())
        clean = normalise(text, {str(work): "<tmp>", str(ROOT): "<repo>"})
        record["report"] = hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()
    else:
        record["report"] = None
        record["stderr"] = normalise(result.stderr.strip().splitlines()[-1:], {str(work): "<tmp>", str(ROOT): "<repo>"})
    return record


def record_all(only: str | None) -> dict[str, dict[str, Any]]:
    """Run every case (or those whose key contains ``only``) and return key -> record."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="onnxprune-record-") as tmp:
        work = Path(tmp).resolve()
        rng = np.random.default_rng(0)
        np.savez(work / "cnn.npz", input=rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
        np.savez(work / "cnn_eval.npz", input=rng.standard_normal((16, 3, 32, 32)).astype(np.float32),
                 labels=rng.integers(0, 10, 16))
        for fixture, mode, options in cases(work):
            key = f"{fixture} {mode}"
            if only and only not in key:
                continue
            results[key] = run_case(fixture, options, work)
            print(f"{key}: exit {results[key]['exit']}", file=sys.stderr)
    return results


def compare(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """One line per case whose record differs, is missing or is new."""
    lines = []
    for key in sorted(set(expected) | set(actual)):
        if key not in actual:
            lines.append(f"{key}: not run")
        elif key not in expected:
            lines.append(f"{key}: new case (not in the baseline)")
        elif expected[key] != actual[key]:
            fields = [f for f in sorted(set(expected[key]) | set(actual[key]))
                      if expected[key].get(f) != actual[key].get(f)]
            lines.append(f"{key}: differs in {', '.join(fields)}: {expected[key]} != {actual[key]}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="record every case into this JSON file")
    group.add_argument("--check", type=Path, help="compare every case with this JSON file")
    parser.add_argument("--only", help="run only the cases whose 'fixture mode' key contains this text")
    args = parser.parse_args()
    results = record_all(args.only)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(results)} cases into {args.write}")
        return 0
    expected = json.loads(args.check.read_text())
    if args.only:
        expected = {k: v for k, v in expected.items() if args.only in k}
    differences = compare(expected, results)
    for line in differences:
        print(line)
    print(f"{len(results)} cases run, {len(differences)} differ")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
