"""``python -m clinisynth.cli`` = ``clinisynth``."""

import sys

from clinisynth.cli import main

sys.exit(main())
