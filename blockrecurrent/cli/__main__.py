"""`python -m blockrecurrent.cli`: the `brt` command line."""

import sys

from . import main

sys.exit(main())
