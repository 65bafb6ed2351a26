"""``python -m thinwire.bench`` is the ``thinwire`` command."""

import sys

from thinwire.bench.cli import main

sys.exit(main())
