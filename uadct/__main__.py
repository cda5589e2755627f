"""Entry point for ``python -m uadct``."""

from uadct.cli import main

main()
