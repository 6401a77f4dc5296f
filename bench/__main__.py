"""``python -m annlib.bench`` is the same as ``annlib-bench``."""

import sys

from .cli import main

sys.exit(main())
