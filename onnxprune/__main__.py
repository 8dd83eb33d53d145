"""``python -m onnxprune`` runs the command-line interface."""

from .cli import main

main()
