"""python -m evaluation: the same as `tina eval`."""

import sys

from tina.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
