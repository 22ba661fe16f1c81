"""``python -m edgecloud`` = the ``edgecloud`` command."""

import sys

from edgecloud.cli import main

sys.exit(main())
