"""``python -m kdcompress`` is ``kdcompress``."""

import sys

from kdcompress.cli import main

sys.exit(main())
