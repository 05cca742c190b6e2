"""``python -m bench``: see bench/run.py."""

import os
import sys

from bench.run import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.exit(main())
