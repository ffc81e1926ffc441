"""``python -m edge`` runs the ``tpo-edge`` command."""

from edge.cli import main

main()
