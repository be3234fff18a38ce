"""``python -m producer.cli``: the ``fedplan`` console script."""

import sys

from producer.cli.main import main

sys.exit(main())
