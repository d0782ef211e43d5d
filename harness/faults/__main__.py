"""``python -m harness.faults``: run the fault suite."""

import sys

from harness.faults.report import main

sys.exit(main())
