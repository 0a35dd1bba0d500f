"""`python -m attentionpack`: the command line (attentionpack/cli.py)."""

from .cli import main

main()
