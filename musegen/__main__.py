"""`python -m musegen` runs the CLI."""

from musegen.cli import main

main()
