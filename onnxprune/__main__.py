"""``python -m onnxprune`` runs the command-line interface (signal handlers first: see ``entry.py``)."""

from .entry import main

main()
