"""`python -m musegen` runs the CLI."""

from musegen.apps.cli import main

main()
