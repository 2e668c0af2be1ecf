"""``python -m apudae_engine``: the ``apudae-engine`` command, for environments without the
console script (an uninstalled checkout on ``PYTHONPATH``)."""

import sys

from apudae_engine.cli.main import main

sys.exit(main())
