"""`python -m mptun` is the `mptun` command."""

from mptun.cli import main

main()
