"""``python -m regionsearch.cli``."""

from regionsearch.cli.app import main

main()
