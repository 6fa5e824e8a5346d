"""``python -m vnpager``: the vnpager command (vnpager.tools.cli)."""

import sys

from vnpager.tools.cli import main

sys.exit(main())
