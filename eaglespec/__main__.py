"""``python -m eaglespec``: the same command line as ``eaglespec``."""

import sys

from eaglespec.cli import main

sys.exit(main())
