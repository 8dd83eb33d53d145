"""The op rules, one module per op family: how channels flow through each op.

A rule is called for a node with at least one input carrying channels. It sets the annotation of the node's
outputs (or none: the channels are consumed), records the weight slices, per-channel constants and attributes
that follow the channels, ties channels that must go together, or raises :class:`Freeze` with the reason the
channels must stay. A producer (``@producer``) gives new channel ids to the outputs of a node no channels reach.
The registry (``RULES``, ``DESCRIPTIONS``, ``PRODUCERS``) lives in :mod:`..registry`; :mod:`.catalog` imports every
family module, which fills it. This file imports no family module (a package's ``__init__`` that imports its own
modules is an import cycle, tests/test_imports.py).
"""

from ..registry import DESCRIPTIONS, PRODUCERS, RULES

__all__ = ["DESCRIPTIONS", "PRODUCERS", "RULES"]
