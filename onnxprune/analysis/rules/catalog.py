"""Every rule family, imported so that the registry is full: what the graph walk (:mod:`..groups`) imports."""

from ..registry import DESCRIPTIONS, PRODUCERS, RULES, producer_rule
from . import elementwise, frozen, layers, layout, norms, recurrent, shape_plumbing  # noqa: F401 - they register
from .contrib import CUSTOM_PRODUCERS

__all__ = ["CUSTOM_PRODUCERS", "DESCRIPTIONS", "PRODUCERS", "RULES", "producer_rule"]
