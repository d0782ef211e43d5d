"""``python -m harness.bench``: run a benchmark scenario."""

import sys

from harness.bench.cli import main

sys.exit(main())
