"""``python -m vmctl.cli``: the ``vmctl`` command."""

import sys

from vmctl.cli import main

sys.exit(main())
