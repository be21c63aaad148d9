"""``python -m servegym.perfmodel``: see :mod:`servegym.perfmodel.cli`."""

import sys

from servegym.perfmodel.cli import main

sys.exit(main())
