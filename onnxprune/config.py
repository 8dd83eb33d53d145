"""Configuration objects shared by the CLI and the Python API (one vocabulary for both)."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

from .errors import UsageError

CRITERIA_UNSTRUCTURED = ("l1", "l2", "random", "activation", "obs")
CRITERIA_STRUCTURED = ("l1", "l2", "random", "bn", "activation", "reconstruction")
#: settings measured on calibration data: ``--reconstruct`` and these criteria
CALIBRATED = ("reconstruct", "reconstruction", "activation", "obs")


@dataclass
class PruneConfig:
    """What to prune and how. Mirrors the CLI options of ``onnxprune MODEL``."""

    sparsity: float | None = None
    threshold: float | None = None
    criterion: str | None = None  # None: "reconstruction" for --structured --reconstruct, else "l1"
    scope: str = "layer"
    pattern: str | None = None
    structured: bool = False
    round_to: int = 1
    exclude: list[str] = field(default_factory=list)
    min_params: int = 0
    prune_first: bool = True
    prune_last: bool = True
    include_embeddings: bool = False
    max_layer_sparsity: float = 0.99
    seed: int = 0
    fold_constants: bool = True
    prune_layernorm: bool = False
    overrides: list[dict] = field(default_factory=list)  # recipe: [{match, sparsity|pattern|method|exclude}]
    reconstruct: bool = False  # structured: least-squares refit of the layers that lost inputs (calibration data)
    repair: str | None = None  # unstructured --reconstruct: obs (default: OBS, never worse than rowwise per layer) | rowwise
    calibration_data: str | None = None  # .npz file, or a directory of .npz/.npy files or images
    image_size: tuple[int, int] | None = None  # image calibration data: resize to (height, width)
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    image_layout: str = "nchw"
    image_channels: str = "rgb"
    head_sparsity: float = 0.0  # structured: share of attention heads removed (--sparsity covers the rest)
    target_macs: float | None = None  # structured: keep this fraction of MACs, ratios chosen by sensitivity
    target_params: float | None = None
    uniform: bool = False  # structured: the same ratio in every group even with calibration data
    drop_blocks: int = 0  # depth: remove this many residual blocks, lowest block influence first (calibration data)
    depth_sparsity: float = 0.0  # depth: remove this share of the removable residual blocks, rounded down
    # depth: the blocks (their Add's output) to remove instead of the least influential; --target-macs with
    # drop_blocks/depth_sparsity (then an upper bound) sets it from measured cost per MAC saved
    blocks_chosen: list[str] | None = None
    keep_tokens: str | None = None  # vocabulary: file of token ids to keep (text or .npy)
    vocab_from_calibration: bool = False  # vocabulary: keep the ids the calibration data's token inputs hold
    unknown_token: int | None = None  # vocabulary: where ids not kept are mapped (default: see passes/vocabulary.py)
    shrink_logits: bool = False  # vocabulary: logits [.., K] over the kept tokens instead of [.., V]
    hidden_sparsity: float = 0.0  # share of the residual stream's hidden size removed by rotation (calibration data)
    hidden_widths: str = "tail"  # post-LN streams' per-segment widths: tail (last two whole) | measured (probe runs)

    def validate(self) -> PruneConfig:
        """The settings to run, as a new config with the default criterion resolved; raise :class:`UsageError` for
        inconsistent or out-of-range settings. ``self`` is never changed."""
        config = replace(self, criterion=self.criterion or self.default_criterion())
        config._check()
        config._validated = config._settings()  # what checked() compares with (a copy: lists may be changed in place)
        return config

    def checked(self) -> PruneConfig:
        """This config when :meth:`validate` returned it and no setting changed since, else ``self.validate()``: the
        settings are checked once on their way through the CLI and ``prune`` (configs made by ``replace`` are new)."""
        if getattr(self, "_validated", None) == self._settings():
            return self
        return self.validate()

    def _settings(self) -> list:
        return copy.deepcopy([getattr(self, f.name) for f in fields(self)])

    def default_criterion(self) -> str:
        """``reconstruction`` for structured repair (the channels its least squares can best do without), else l1."""
        return "reconstruction" if self.structured and self.reconstruct and self.calibration_data else "l1"

    def _check(self) -> None:
        """Raise :class:`UsageError` for inconsistent or out-of-range settings."""
        self.require_calibration(bool(self.calibration_data), ("reconstruction",))
        self._check_depth()
        self._check_hidden()
        if self.sparsity is not None and not (0.0 <= self.sparsity < 1.0):
            raise _usage(f"{{sparsity}} must be in [0, 1), got {self.sparsity}", self.sparsity)
        if self.threshold is not None and self.threshold < 0:
            raise _usage(f"{{threshold}} must be >= 0, got {self.threshold}", self.threshold)
        if self.threshold is not None and self.sparsity is not None:
            raise _usage("give either {sparsity} or {threshold}, not both")
        if self.threshold is not None and (self.structured or self.pattern):
            raise _usage("{threshold} applies to unstructured pruning only")
        if self.pattern is not None:
            self.nm()  # raises on a malformed pattern
            if self.structured:
                raise _usage("{pattern} (N:M) and {structured} cannot be combined")
        for entry in self.overrides:
            if entry.get("pattern") is not None:
                PruneConfig(pattern=entry["pattern"]).nm()
        for name in ("target_macs", "target_params"):
            value = getattr(self, name)
            if value is not None:
                option = "{" + name + "}"
                if not self.structured:
                    raise _usage(f"{option} applies to {{structured}} pruning")
                if not 0 < value <= 1:
                    raise _usage(f"{option} must be in (0, 1], the fraction to keep; got {value}", value)
                if self.sparsity is not None:
                    raise _usage(f"give either {{sparsity}} or {option}, not both")
        if self.uniform and (self.target_macs is not None or self.target_params is not None):
            raise _usage("{uniform} and {target_macs}/{target_params} cannot be combined")
        if self.target_macs is not None and self.target_params is not None:
            raise _usage("give either {target_macs} or {target_params}, not both")
        self._check_vocabulary()
        if self.target_macs is not None or self.target_params is not None:
            return
        if self.sparsity is None and self.threshold is None and self.pattern is None and not self.overrides:
            if self.hidden_sparsity or self.prunes_vocabulary() or (self.depth and not self.structured):
                return  # hidden size, vocabulary or depth pruning alone
            raise _usage("nothing to do: give {sparsity}, {threshold}, {pattern}, {drop_blocks}, {depth_sparsity}, "
                         "{hidden_sparsity}, {keep_tokens} or {vocab_from_calibration}")
        allowed = CRITERIA_STRUCTURED if self.structured else CRITERIA_UNSTRUCTURED
        if self.criterion not in allowed:
            raise _usage(f"{{criterion}} {self.criterion!r} is not available here; choose from {', '.join(allowed)}",
                         self.criterion)
        if self.scope not in ("layer", "global"):
            raise _usage(f"{{scope}} must be 'layer' or 'global', got {self.scope!r}", self.scope)
        self.require_calibration(bool(self.calibration_data), ("reconstruct",))
        if self.repair is not None and self.repair not in ("obs", "rowwise"):
            raise _usage(f"{{repair}} must be 'obs' or 'rowwise', got {self.repair!r}", self.repair)
        if self.repair is not None and (self.structured or not self.reconstruct):
            raise _usage("{repair} chooses the repair of unstructured/N:M {reconstruct}; give {reconstruct}, "
                             "without {structured}")
        self.require_calibration(bool(self.calibration_data), ("activation", "obs"))
        if self.criterion == "obs" and self.threshold is not None:
            raise _usage("{criterion} obs chooses its own mask: give {sparsity} or {pattern}, not {threshold}")
        if self.criterion == "activation" and not self.structured and self.scope == "global":
            raise _usage("{criterion} activation ranks weights within each output row; {scope} global does not apply")
        if not 0.0 <= self.head_sparsity < 1.0:
            raise _usage(f"{{head_sparsity}} must be in [0, 1), got {self.head_sparsity}", self.head_sparsity)
        if self.round_to < 1:
            raise _usage(f"{{round_to}} must be >= 1, got {self.round_to}", self.round_to)
        if self.min_params < 0:
            raise _usage(f"{{min_params}} must be >= 0, got {self.min_params}", self.min_params)
        if not (0.0 < self.max_layer_sparsity < 1.0):
            raise _usage(f"{{max_layer_sparsity}} must be in (0, 1), got {self.max_layer_sparsity}",
                         self.max_layer_sparsity)

    @property
    def depth(self) -> bool:
        """Whether residual blocks are to be removed (``drop_blocks`` or ``depth_sparsity``)."""
        return bool(self.drop_blocks or self.depth_sparsity)

    def _check_depth(self) -> None:
        """Range and consistency of the depth settings; they score blocks on calibration data."""
        if isinstance(self.drop_blocks, bool) or not isinstance(self.drop_blocks, int) or self.drop_blocks < 0:
            raise _usage(f"{{drop_blocks}} must be a whole number >= 0, got {self.drop_blocks!r}", self.drop_blocks)
        if not isinstance(self.depth_sparsity, (int, float)) or not 0.0 <= self.depth_sparsity < 1.0:
            raise _usage(f"{{depth_sparsity}} must be in [0, 1), got {self.depth_sparsity!r}", self.depth_sparsity)
        if self.drop_blocks and self.depth_sparsity:
            raise _usage("give either {drop_blocks} or {depth_sparsity}, not both")
        if self.depth and self.target_params is not None:
            raise _usage("{target_params} allocates width only and would miss the target after depth pruning; with "
                         "{drop_blocks}/{depth_sparsity} give {sparsity} or {target_macs}")
        if self.blocks_chosen is not None:
            if not isinstance(self.blocks_chosen, list) or not all(isinstance(n, str) for n in self.blocks_chosen):
                raise _usage(f"{{blocks_chosen}} must be a list of block output names, got {self.blocks_chosen!r}",
                             self.blocks_chosen)
            if not self.depth:
                raise _usage("{blocks_chosen} applies to depth pruning: give {drop_blocks} or {depth_sparsity}")
        if self.depth and not self.calibration_data:
            option = "{drop_blocks}" if self.drop_blocks else "{depth_sparsity}"
            raise _usage(f"{option} needs {{calibration_data}}: blocks are chosen by their influence measured on it")


    def prunes_weights(self) -> bool:
        """Whether width or magnitude pruning has something to do (a ratio, threshold, pattern, target or override)."""
        return any(value is not None for value in (self.sparsity, self.threshold, self.pattern, self.target_macs,
                                                     self.target_params)) or bool(self.overrides)

    def prunes_vocabulary(self) -> bool:
        """Whether the vocabulary pass runs (a keep list or the calibration data's token ids)."""
        return bool(self.keep_tokens) or self.vocab_from_calibration

    def _check_vocabulary(self) -> None:
        """The vocabulary options: one source of kept ids; the others only with one."""
        if self.keep_tokens and self.vocab_from_calibration:
            raise _usage("give either {keep_tokens} or {vocab_from_calibration}, not both")
        if self.vocab_from_calibration and not self.calibration_data:
            raise _usage("{vocab_from_calibration} needs {calibration_data}")
        if not self.prunes_vocabulary():
            for name in ("unknown_token", "shrink_logits"):
                if getattr(self, name) not in (None, False):
                    raise _usage(f"{{{name}}} applies to vocabulary pruning: give {{keep_tokens}} or "
                                 "{vocab_from_calibration}")
        if self.unknown_token is not None and (isinstance(self.unknown_token, bool)
                                               or not isinstance(self.unknown_token, int) or self.unknown_token < 0):
            raise _usage(f"{{unknown_token}} must be a token id >= 0, got {self.unknown_token!r}", self.unknown_token)

    def _check_hidden(self) -> None:
        """``hidden_sparsity``: in [0, 1), measured on calibration data."""
        if not 0.0 <= self.hidden_sparsity < 1.0:
            raise _usage(f"{{hidden_sparsity}} must be in [0, 1), got {self.hidden_sparsity}", self.hidden_sparsity)
        if self.hidden_sparsity and not self.calibration_data:
            raise _usage("{hidden_sparsity} needs {calibration_data} (the rotation is the PCA of the stream's "
                         "activations)")
        if self.hidden_widths not in ("tail", "measured"):
            raise _usage(f"{{hidden_widths}} must be 'tail' or 'measured', got {self.hidden_widths!r}",
                         self.hidden_widths)

    def require_calibration(self, available: bool, settings: Sequence[str] = CALIBRATED) -> None:
        """The one "needs calibration data" check: ``reconstruct``, or a criterion among ``settings`` measured on
        calibration data, without any (``available``) is a usage error."""
        if available:
            return
        if "hidden" in settings:
            raise _usage("{hidden_sparsity} needs {calibration_data}")
        if "reconstruct" in settings and self.reconstruct:
            raise _usage("{reconstruct} needs {calibration_data}")
        if self.criterion in settings:
            raise _usage(f"{{criterion}} {self.criterion} needs {{calibration_data}}", self.criterion)

    def nm(self) -> tuple[int, int] | None:
        """The N:M pattern as integers, or None."""
        if self.pattern is None:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.pattern)
        if not match:
            raise _usage(f"malformed {{pattern}} {self.pattern!r}: expected N:M such as 2:4", self.pattern)
        n, m = int(match.group(1)), int(match.group(2))
        if m < 2 or n < 1 or n >= m:
            raise _usage(f"{{pattern}} {self.pattern!r}: need 1 <= N < M and M >= 2 (N weights zeroed of every M)",
                         self.pattern)
        return n, m


@dataclass
class ValidateConfig:
    """How the original and pruned models are compared in onnxruntime."""

    enabled: bool = True
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    data: str | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    threads: int = 1
    warmup: int = 3
    runs: int = 20
    seed: int = 0
    min_cosine: float | None = None
    max_rel_l2: float | None = None
    min_top1: float | None = None
    eval_data: str | None = None
    max_accuracy_drop: float | None = None  # top-1 percentage points


def _usage(message: str, value: object = None) -> UsageError:
    """A usage error whose message names settings as ``{field}``; the CLI spells them as its flags."""
    return UsageError(message, options=re.findall(r"\{([a-z_]+)\}", message), value=value)


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """``name:1x3x224x224`` -> ("name", [1, 3, 224, 224])."""
    name, sep, dims = spec.rpartition(":")
    if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims.strip()):
        raise _usage(f"malformed {{input_shape}} {spec!r}: expected NAME:D1xD2x... such as input:1x3x224x224", spec)
    return name, [int(d) for d in dims.strip().split("x")]
