"""`python -m blockrecurrent.train` (what torchrun launches): the trainer's command line."""

import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main())
