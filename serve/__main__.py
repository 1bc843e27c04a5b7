"""`python -m serve [--checkpoint PATH] [--host H] [--port P] [--share]`: the same as `tina demo`."""

import sys

from serve.app import main

sys.exit(main())
