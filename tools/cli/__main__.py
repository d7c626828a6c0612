"""``python -m slmedge.tools.cli``: the ``slmedge`` command, as the console script runs it."""

import sys

from slmedge.tools.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
