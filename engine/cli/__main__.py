"""``python -m apudae_engine.cli``: the same as the console script."""

import sys

from apudae_engine.cli.main import main

sys.exit(main())
