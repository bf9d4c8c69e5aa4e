"""`python -m jaxsae COMMAND ...`, the same as the `jaxsae` command."""

from jaxsae.cli import main

main()
