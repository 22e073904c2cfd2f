"""``python -m clinisynth`` = ``clinisynth``."""

import sys

from clinisynth.cli import main

sys.exit(main())
