"""`python -m zoo_builder build CONFIG key=value ...`"""

import sys

from zoo_builder.build import main

sys.exit(main(sys.argv[1:]))
