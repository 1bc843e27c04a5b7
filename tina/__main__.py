"""`python -m tina ...` = the `tina` command (for environments where the package is on PYTHONPATH but not installed)."""

import sys

from tina.cli import main

sys.exit(main())
