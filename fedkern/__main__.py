"""``python -m fedkern``: the same command line as the ``fedkern`` script."""

import sys

from fedkern.cli import main

sys.exit(main())
