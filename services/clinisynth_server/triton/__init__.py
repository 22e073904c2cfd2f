"""Triton runtime layer: launch the real ``tritonserver``, talk to it, build its repository.

- :mod:`.launcher` — :class:`TritonServer`, the binary shipped in the nvidia-pytriton wheel.
- :mod:`.client` — :class:`TritonClient`, the one typed gRPC wrapper every service uses.
- :mod:`.repository` — write models (a *role* + weights) into a Triton model repository.
- :mod:`.backends` — the torch code that runs inside Triton's python backend, one module a role.

Nothing here imports torch at import time; only the backends do, lazily, inside Triton.
"""
