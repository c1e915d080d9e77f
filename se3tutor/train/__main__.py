"""``python -m se3tutor.train``: see :mod:`se3tutor.train`."""

import sys

from se3tutor.train.loop import main

sys.exit(main())
