"""The package's import graph, read with ``ast``: no cycles, analysis never imports the layers above it, and
imports inside functions only for optional heavy modules (docs/architecture.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxprune"

#: modules under ``onnxprune.analysis`` may not import these (nor anything under them)
ABOVE_ANALYSIS = ("onnxprune.passes", "onnxprune.validate", "onnxprune.cli", "onnxprune.api")
#: the layers of docs/architecture.md ("Layers"), bottom up: a module imports only from its own layer or lower ones
LAYERS = {
    0: ["errors", "signals", "config", "heap"],
    1: ["graph", "outputs", "model_file", "stored_weights", "model", "shapes"],
    2: ["sessions", "specs", "dynamic_dims", "synthetic", "feeds", "sample_parts"],
    3: ["analysis", "analysis.weights", "analysis.blocks", "analysis.stream_model", "analysis.stream", "analysis.registry", "analysis.groups", "analysis.cost", "analysis.rules",
        "analysis.vocab",
        *(f"analysis.rules.{family}" for family in ("_common", "operands", "shape_plumbing", "layers", "norms",
                                                     "elementwise", "layout", "recurrent", "contrib", "frozen",
                                                     "catalog"))],
    4: ["calibration", "activation_stream", "gram", "consumer_grams", "selection_windows", "refit", "compensation", "scoring", "obs_solve", "spd_solve", "row_parts", "obs", "accuracy", "validate", "recipe", "quantize"],
    5: ["passes", "passes.manager", "passes.canonical", "passes.subgraphs", "passes.unstructured", "passes.removal",
        "passes.structured", "passes.reconstruction", "passes.prepare", "passes.depth", "passes.vocabulary", "passes.rotation",
        "passes.hidden_widths", "passes.hidden_refit",
        "probe_refit", "probe", "plan_macs", "sensitivity", "allocation", "depth_allocation", "refusals", "validate_step", "inspect"],
    6: ["report", "html_report", "report_files", "api", "cli", "entry", "__main__"],
}
#: what a function may import: optional or heavy modules that most runs never need
LAZY_ALLOWED = {
    "matplotlib", "matplotlib.pyplot",  # sensitivity --plot
    "PIL",  # image folders as calibration data
    "yaml",  # YAML recipes
    "onnx.reference",  # evaluating shape arithmetic (slow to import)
    "onnxruntime.quantization",  # --quantize
}
#: (module, imported module): imports deferred on purpose, with the reason
LAZY_EXCEPTIONS = {
    ("onnxprune.entry", "onnxprune.cli"): "signal handlers are installed before numpy/onnx/onnxruntime load",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names of what ``node`` imports: the module, or for ``from X import y`` X and X.y when y is one."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import that runs (``TYPE_CHECKING`` blocks skipped)."""
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend((name, in_function, child.lineno) for name in _resolve(module, is_package, child))
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Module -> the package modules it imports (package ``__init__`` files included), and every import made
    inside a function as (module, imported name, line)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    lazy: list[tuple[str, str, int]] = []
    for name, path in files.items():
        imported = _imports(ast.parse(path.read_text(), str(path)), name, _is_package(path))
        for target, in_function, line in imported:
            if in_function and (target in files or not target.startswith("onnxprune")):
                lazy.append((name, target, line))
            parts = target.split(".")
            for depth in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ too
                prefix = ".".join(parts[:depth])
                if prefix in files and prefix != name:
                    graph[name].add(prefix)
    return graph, lazy


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_is_read():
    graph, _ = import_graph()
    assert "onnxprune.model" in graph["onnxprune.api"]
    assert "onnxprune.passes" in graph["onnxprune.passes.structured"]  # the package's __init__ runs first


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_module_is_the_bottom_of_its_layer():
    """``graph`` (walking, weights, attributes) imports nothing of the package; files and shapes build on it."""
    graph, _ = import_graph()
    assert graph["onnxprune.graph"] == set()
    assert "onnxprune.graph" in graph["onnxprune.model"] and "onnxprune.graph" in graph["onnxprune.shapes"]


def test_no_import_cycles():
    graph, _ = import_graph()
    assert find_cycle(graph) is None


def test_analysis_imports_nothing_above_it():
    graph, _ = import_graph()
    wrong = sorted((name, target) for name, targets in graph.items() if name.startswith("onnxprune.analysis")
                   for target in targets if target.startswith(ABOVE_ANALYSIS))
    assert wrong == []


def test_imports_follow_the_layers():
    graph, _ = import_graph()
    layer = {f"onnxprune.{name}": number for number, names in LAYERS.items() for name in names}
    assert sorted(set(graph) - set(layer) - {"onnxprune"}) == [], "every module has a layer in LAYERS"
    upward = sorted(f"{name} (layer {layer[name]}) imports {target} (layer {layer[target]})"
                    for name, targets in graph.items() if name in layer for target in targets
                    if layer[target] > layer[name])
    assert upward == []


def test_function_local_imports_are_only_optional_heavy_modules():
    _, lazy = import_graph()
    wrong = [f"{name}:{line} imports {target}" for name, target, line in lazy
             if target not in LAZY_ALLOWED and (name, target) not in LAZY_EXCEPTIONS
             and not any(target.startswith(allowed + ".") for allowed in LAZY_ALLOWED)]
    assert wrong == []
