"""`python -m blockrecurrent.bench`: the benchmark's command line (as `brt bench`)."""

import sys

from .command import cli

if __name__ == "__main__":
    sys.exit(cli())
