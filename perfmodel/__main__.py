"""``python -m perfmodel``: see :mod:`perfmodel.cli`."""

import sys

from perfmodel.cli import main

sys.exit(main())
