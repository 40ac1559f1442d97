"""``python -m qbench`` runs the command line."""

from qbench.cli import main

main()
