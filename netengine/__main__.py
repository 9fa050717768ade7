"""``python -m netengine <command>``: the same as the ``netengine`` console script."""
import sys

from netengine.cli.main import main

sys.exit(main())
