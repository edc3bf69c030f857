"""`python -m shardyard.cli ARGS` is `shardyard ARGS`."""

import sys

from shardyard.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
