"""clinisynth server side: the four gRPC services and the code they share.

Import ``clinisynth_server.<concern>``; nothing here loads a model at import time.
"""

__version__ = "0.1.0"
