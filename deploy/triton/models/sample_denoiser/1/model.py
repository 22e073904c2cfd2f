"""Triton python-backend entry, clinisynth role 'denoiser'. Generated; do not edit."""

import os
import site
import sys

for _entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)
        site.addsitedir(_entry)  # honour .pth files (editable installs)

from clinisynth_server.triton.backends._entry import python_model  # noqa: E402

TritonPythonModel = python_model("clinisynth_server.triton.backends.denoiser")
