"""Mutation check: break the pruner on purpose and show which default tests notice.

    python bench/mutation_check.py                 # every mutation against the choice/oracle subset
    python bench/mutation_check.py --full          # every mutation against the whole default suite
    python bench/mutation_check.py --only invert-structured-ranking -- tests/test_choice.py

Each mutation is a small text edit of one package file (invert a ranking, drop one rule's edit, skip a
compensation step). For each, the repository (without .git) is copied to a temporary folder, the edit is
applied there and pytest runs there with ``PYTHONPATH`` pointing at the copy: the working tree is never
changed. A mutation that no test fails "survives"; the script exits 1 if any survives, or if an edit no
longer applies (the code it targets changed: update the mutation). Results: docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: the tests that check which channels/weights go and that removal equals masking (fast: ~2 min on 2 cores)
SUBSET = ["tests/test_choice.py", "tests/test_property_structured.py", "tests/test_property_unstructured.py",
          "tests/test_structured_oracle.py", "tests/test_structured_pass.py", "tests/test_unstructured.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str  # package file, relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact text, replacement); each text must occur exactly once


MUTATIONS = [
    Mutation("invert-structured-ranking", "structured pruning removes the highest-scoring channels",
             "onnxprune/passes/structured.py",
             (("order = np.argsort(scores[g.id], kind=\"stable\")[:n_remove]",
               "order = np.argsort(-scores[g.id], kind=\"stable\")[:n_remove]"),
              ("for _, gid, _ in sorted(pool):", "for _, gid, _ in sorted(pool, reverse=True):"))),
    Mutation("global-scope-unnormalised", "global structured ranking compares raw scores across groups",
             "onnxprune/passes/structured.py",
             (("norm = s / (s.mean() if s.mean() > 0 else 1.0)", "norm = s"),)),
    Mutation("invert-unstructured-ranking", "unstructured pruning zeros the largest weights",
             "onnxprune/passes/unstructured.py",
             (("return np.square(flat) if self.config.criterion == \"l2\" else np.abs(flat)",
               "return -(np.square(flat) if self.config.criterion == \"l2\" else np.abs(flat))"),)),
    Mutation("invert-nm-ranking", "N:M pruning zeros the N largest of every M",
             "onnxprune/passes/unstructured.py",
             (("order = np.argsort(blocks, axis=-1, kind=\"stable\")",
               "order = np.argsort(-blocks, axis=-1, kind=\"stable\")"),)),
    Mutation("concat-offsets-wrong", "Concat places its inputs' channels at the wrong offsets (inputs reversed)",
             "onnxprune/analysis/rules/layout.py",
             (("        _set(a, node, axis, np.concatenate(parts))\n",
               "        _set(a, node, axis, np.concatenate(parts[::-1]))\n"),)),
    Mutation("batchnorm-params-not-sliced", "BatchNormalization bias, mean and var keep every channel",
             "onnxprune/analysis/rules/norms.py",
             (("    for slot in range(1, 5):\n        a.add_weight_edit(node.input[slot], 0, ann.ids, \"param\",",
               "    for slot in range(1, 2):\n        a.add_weight_edit(node.input[slot], 0, ann.ids, \"param\","),)),
    Mutation("skip-bias-folding", "removed channels' constant outputs are not folded into the next biases",
             "onnxprune/passes/structured.py",
             (("elif cfg.fold_constants and not keep.all():", "elif False:"),)),
]


def copy_repository(target: Path) -> Path:
    """The working tree (tracked and untracked files, no .git, no caches) under ``target``."""
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info")
    return Path(shutil.copytree(ROOT, target / "repo", ignore=ignore))


def apply(mutation: Mutation, repo: Path) -> None:
    path = repo / mutation.path
    text = path.read_text()
    for old, new in mutation.edits:
        if text.count(old) != 1:
            raise SystemExit(f"mutation {mutation.name}: {old!r} occurs {text.count(old)} times in {mutation.path}; "
                             "update the mutation to the current code")
        text = text.replace(old, new)
    path.write_text(text)


def failing_tests(repo: Path, tests: list[str], timeout: int) -> tuple[list[str], str]:
    """Run pytest in ``repo``; returns the ids of failed/errored tests and the last line of its output."""
    report = repo / "mutation-junit.xml"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
               f"--junitxml={report}", *tests]
    try:
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return ["(timed out)"], f"timed out after {timeout} s"
    failed = []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}")
    last = (done.stdout.strip().splitlines() or [""])[-1]
    return failed, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    parser.add_argument("--full", action="store_true", help="run the whole default suite for each mutation")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per mutation")
    parser.add_argument("tests", nargs="*", help="test files or ids (default: the choice/oracle subset)")
    args = parser.parse_args()
    tests = args.tests or ([] if args.full else SUBSET)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        raise SystemExit(f"unknown mutation; choose from {', '.join(m.name for m in MUTATIONS)}")
    survivors = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-mutation-") as scratch:
        repo = copy_repository(Path(scratch))
        for mutation in chosen:
            original = (repo / mutation.path).read_text()
            apply(mutation, repo)
            try:
                failed, last = failing_tests(repo, tests, args.timeout)
            finally:
                (repo / mutation.path).write_text(original)
            print(f"\n{mutation.name}: {mutation.what}\n  {len(failed)} failing ({last})", flush=True)
            for test in failed:
                print(f"    {test}", flush=True)
            if not failed:
                survivors.append(mutation.name)
    if survivors:
        print(f"\nsurvived (no test failed): {', '.join(survivors)}")
        return 1
    print(f"\nevery mutation fails at least one test ({len(chosen)} mutations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
