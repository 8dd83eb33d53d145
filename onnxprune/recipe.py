"""Recipes: pruning settings in a YAML (or JSON) file, with per-layer overrides.

A recipe uses the CLI's vocabulary (``sparsity``, ``criterion``, ``scope``, ``pattern``,
``structured`` or ``method``, ``round_to``, ``exclude``...) plus ``overrides``: a list of
``{match: GLOB, sparsity|pattern|method|exclude: ...}`` applied to the weights (unstructured)
or channel groups (structured) whose weight or node names match, first match wins.
``--save-recipe`` writes the recipe a run actually applied, with one override per layer, so
that a re-exported model is pruned the same way.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import PruneConfig
from .errors import UsageError
from .graph import first_match
from .outputs import write_text_atomic

OVERRIDE_KEYS = {"match", "sparsity", "pattern", "method", "exclude"}
METHODS = ("unstructured", "structured")


def _load_text(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"recipe {path} is not valid JSON: {exc}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and check a recipe; returns PruneConfig keyword arguments."""
    path = Path(path)
    data = _load_text(path)
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of settings")
    allowed = {f.name for f in fields(PruneConfig)} | {"method"}
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise UsageError(f"recipe {path}: unknown setting {key!r} (known: {', '.join(sorted(allowed))})")
        settings[name] = value
    method = settings.pop("method", None)
    if method is not None:
        if method not in METHODS:
            raise UsageError(f"recipe {path}: method must be one of {', '.join(METHODS)}, got {method!r}")
        settings["structured"] = method == "structured"
    overrides = settings.get("overrides") or []
    if not isinstance(overrides, list):
        raise UsageError(f"recipe {path}: overrides must be a list")
    for i, entry in enumerate(overrides):
        if not isinstance(entry, dict) or "match" not in entry:
            raise UsageError(f"recipe {path}: override {i} needs a 'match' glob")
        unknown = set(entry) - OVERRIDE_KEYS
        if unknown:
            raise UsageError(f"recipe {path}: override {i} has unknown keys {sorted(unknown)}")
        if "method" in entry and entry["method"] not in METHODS:
            raise UsageError(f"recipe {path}: override {i}: method must be one of {', '.join(METHODS)}")
        if "sparsity" in entry and not (isinstance(entry["sparsity"], (int, float)) and 0 <= entry["sparsity"] < 1):
            raise UsageError(f"recipe {path}: override {i}: sparsity must be in [0, 1)")
    if isinstance(settings.get("exclude"), str):
        settings["exclude"] = [settings["exclude"]]
    return settings


def find_override(config: PruneConfig, names: list[str]) -> dict[str, Any] | None:
    """The first override whose ``match`` glob matches any of ``names``."""
    return first_match(config.overrides, names, lambda entry: entry["match"])


def wants(config: PruneConfig, names: list[str], method: str) -> bool:
    """Whether these layers belong to ``method`` (their override's method, else the run's)."""
    entry = find_override(config, names)
    default = "structured" if config.structured else "unstructured"
    return (entry.get("method", default) if entry else default) == method


def applied_recipe(report: dict[str, Any]) -> dict[str, Any]:
    """The recipe a run applied: its settings, with one exact override per pruned layer."""
    cfg = dict(report["config"])
    recipe: dict[str, Any] = {"method": "structured" if cfg.pop("structured") else "unstructured"}
    for key in ("sparsity", "threshold", "criterion", "scope", "pattern", "round_to", "exclude", "min_params",
                "prune_first", "prune_last", "include_embeddings", "max_layer_sparsity", "seed", "fold_constants",
                "prune_layernorm", "keep_tokens", "vocab_from_calibration", "unknown_token", "shrink_logits"):
        if cfg.get(key) is not None:
            recipe[key] = cfg[key]
    for key in ("drop_blocks", "depth_sparsity", "blocks_chosen"):  # depth: replayed with the run's --calibration-data
        if cfg.get(key):
            recipe[key] = cfg[key]
    if cfg.get("hidden_sparsity"):
        recipe["hidden_sparsity"] = cfg["hidden_sparsity"]
        recipe["hidden_widths"] = cfg.get("hidden_widths", "tail")
    overrides: list[dict[str, Any]] = []
    for p in report["passes"]:
        details = p["details"]
        if p["name"] == "unstructured":
            for t in details["tensors"]:
                entry: dict[str, Any] = {"match": t["weight"], "method": "unstructured"}
                if details["mode"] == "nm":
                    entry["pattern"] = details["pattern"]
                else:
                    entry["sparsity"] = round(t["sparsity"], 6)
                overrides.append(entry)
            for s in details["skipped"]:
                overrides.append({"match": s["weight"], "exclude": True})
        elif p["name"] == "structured":
            for g in details["groups"]:
                removed = g["channels_before"] - g["channels_after"]
                overrides.append({"match": g["producers"][0], "method": "structured",
                                  "sparsity": round(removed / g["channels_before"], 6) if removed else 0.0})
    recipe["scope"] = "layer"  # the per-layer overrides carry the allocation a global ranking made
    recipe["overrides"] = overrides + [dict(entry) for entry in report["config"].get("overrides") or []]
    return recipe


def write_recipe(recipe: dict[str, Any], path: Path) -> None:
    """Write a recipe as YAML (or JSON for a .json name), atomically."""
    if path.suffix.lower() == ".json":
        text = json.dumps(recipe, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(recipe, sort_keys=False)
    write_text_atomic(Path(path), text, "recipe")
