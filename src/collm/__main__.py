"""`python -m collm`: the `collm` command."""

from collm.cli import main

main()
