"""Torch code that runs inside Triton's python backend, one module per *role*.

A role module ``clinisynth_server.triton.backends.<role>`` exports:

- ``model_spec(weights_dir, parameters) -> ModelSpec`` — inputs/outputs for ``config.pbtxt``
  (may read the checkpoint's ``config.json``; must not import torch);
- ``Backend(weights_dir, parameters, device)`` — callable, batched numpy in → numpy out.

Roles living elsewhere are added with
:func:`clinisynth_server.triton.repository.register_role` (role name → module path).
Module names starting with ``_`` are helpers, never roles.
"""
