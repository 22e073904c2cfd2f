"""An Image holding a PACS reference where no service fetches one is refused on its own field,
with the reason — not decoded as an empty image."""

from __future__ import annotations

import pytest

from clinisynth.v1 import common_pb2
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.protoconv import decode_input_image


def test_pacs_reference_is_refused_by_name_where_it_is_not_fetched() -> None:
    image = common_pb2.Image(pacs=common_pb2.PacsRef(pacs="orthanc", sop_uid="1.2.3"))
    with pytest.raises(InvalidArgument) as err:
        decode_input_image(image, field="init_image")
    violation = err.value.violations[0]
    assert violation.field == "init_image.pacs"
    assert "PACS references" in violation.description and "send the image" in violation.description
