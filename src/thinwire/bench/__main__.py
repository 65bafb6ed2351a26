"""``python -m thinwire.bench`` is the ``thinwire`` command."""

import sys

from thinwire.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
