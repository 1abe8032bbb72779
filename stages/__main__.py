"""`python -m stages <command>`: the same app as the `lra` console script."""

from stages.launch import main

main()
