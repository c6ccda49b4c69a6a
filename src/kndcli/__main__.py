"""`python -m kndcli` runs the `knd` command."""

from kndcli.cli.main import main

main()
