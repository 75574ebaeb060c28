"""`python -m imagetx.cli`, as torchrun runs it: the console script."""

from imagetx.cli import main

main()
