"""Serving layouts: how a served model's components map onto Triton models.

- ``split`` (the default): one Triton model per component, ``<name>.<role>``; each instance is
  its own python-backend process with torch loaded.
- ``packed``: one Triton model per served model, ``<name>.packed``, whose process holds every
  component and dispatches by the tensor names' component prefix. Fewer processes (one per
  instance instead of one per component and instance), no parallelism between components of
  one model, and one crash takes the whole model down.

A catalog record names each component by its *address*: the Triton model for ``split``, or
``<name>.packed/<role>`` for ``packed``. The address is also where that component's weights
lie in the repository (``<repo>/<address>/<version>/weights``; Triton ignores a model folder's
non-numeric sub-folders), so code that reads weights by address works in both layouts. Only
:class:`~clinisynth_server.triton.client.TritonClient` turns an address into a Triton model
and tensor names. No torch, no tritonclient here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from clinisynth_server.errors import InvalidArgument

Layout = Literal["split", "packed"]
LAYOUTS: tuple[Layout, ...] = ("split", "packed")
DEFAULT_LAYOUT: Layout = "split"
#: The Triton model of a packed served model is ``<name>`` + this suffix.
PACKED_SUFFIX = ".packed"
#: The role recorded in a packed model's ``config.pbtxt``.
PACKED_ROLE = "packed"
#: Between the Triton model and the component in an address (never in a Triton model name).
ADDRESS_SEPARATOR = "/"
#: Between the component and the tensor (or parameter) name inside a packed model.
TENSOR_SEPARATOR = "__"
#: Parameters of a packed model itself, not any component's.
OWN_PARAMETERS = frozenset({"clinisynth_role", "packed_roles"})


def check_layout(value: str, field: str = "layout") -> Layout:
    """A requested layout ("" → the default) as the literal type; INVALID_ARGUMENT otherwise."""
    if not value:
        return DEFAULT_LAYOUT
    if value == "split":
        return "split"
    if value == "packed":
        return "packed"
    raise InvalidArgument.for_field(field, f"one of {', '.join(LAYOUTS)}; got {value!r}")


def packed_model(name: str) -> str:
    """The Triton model serving every component of ``name`` in the packed layout."""
    return f"{name}{PACKED_SUFFIX}"


def address(triton_model: str, component: str) -> str:
    """A packed component's address: ``<triton model>/<component>``."""
    if not component or TENSOR_SEPARATOR in component or ADDRESS_SEPARATOR in component:
        raise InvalidArgument.for_field(
            "component", f"not a packable component name: {component!r}"
        )
    return f"{triton_model}{ADDRESS_SEPARATOR}{component}"


def split_address(value: str) -> tuple[str, str]:
    """``(Triton model, component)`` of an address; component is "" for a split model."""
    model, _, component = value.partition(ADDRESS_SEPARATOR)
    return model, component


def served_model(value: str) -> str:
    """The Triton model an address is served by."""
    return split_address(value)[0]


def tensor_name(component: str, name: str) -> str:
    """A component's tensor (or parameter) name inside a packed model."""
    return f"{component}{TENSOR_SEPARATOR}{name}"


def split_tensor_name(value: str) -> tuple[str, str]:
    """``(component, name)`` of a packed tensor name; component "" when it has no prefix."""
    component, sep, name = value.partition(TENSOR_SEPARATOR)
    return (component, name) if sep else ("", value)


def component_parameters(parameters: Mapping[str, str], component: str) -> dict[str, str]:
    """One component's parameters in a packed config: the unprefixed ones (shared by every
    component), then its own ``<component>__<key>`` ones, unprefixed."""
    shared = {
        key: value
        for key, value in parameters.items()
        if key not in OWN_PARAMETERS and not split_tensor_name(key)[0]
    }
    own = {}
    for key, value in parameters.items():
        prefix, name = split_tensor_name(key)
        if prefix == component:
            own[name] = value
    return {**shared, **own}
