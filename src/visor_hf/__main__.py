"""`python -m visor_hf ...` runs the `visor-hf` command line."""

import sys

from .cli import main

sys.exit(main())
