"""``python -m fluxvelo.gen train ...`` / ``python -m fluxvelo.gen sample ...``."""

import sys

from ._cli import main

sys.exit(main())
