"""`python -m datainf` runs the command line."""

from datainf.cli import main

main()
