"""``python -m plugin.cli``."""

import sys

from plugin.cli.app import main

sys.exit(main())
