"""The per-destination retrieve method (``retrieve = "wado" | "c-get" | "c-move"``) and the
time budget of one PACS fetch: the destination's ``timeout_s`` capped by the caller's deadline."""

from __future__ import annotations

import pytest

from clinisynth_server.errors import DeadlineExceeded, InvalidArgument, Unavailable
from clinisynth_server.pacs.config import parse_destination
from clinisynth_server.pacs.fetch import budget_for, c_get, c_move, retriever, wado_rs

DIMSE = {"host": "h", "port": 104, "called_ae": "PACS"}
MOVE = {**DIMSE, "retrieve": "c-move", "move_ae_title": "US", "move_port": 11113}


def test_retrieve_defaults_and_choices() -> None:
    web = parse_destination("w", {"dicomweb_url": "http://x"})
    get = parse_destination("g", DIMSE)
    move = parse_destination("m", MOVE)
    assert (web.retrieve, get.retrieve, move.retrieve) == ("wado", "c-get", "c-move")
    assert (retriever(web), retriever(get), retriever(move)) == (wado_rs, c_get, c_move)
    assert (move.move_ae_title, move.move_port, move.move_host) == ("US", 11113, "0.0.0.0")
    narrowed = parse_destination("m", {**MOVE, "move_host": "10.1.2.3"})
    assert narrowed.move_host == "10.1.2.3"


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"dicomweb_url": "http://x", "retrieve": "c-get"}, "pacs.p.retrieve"),
        ({**DIMSE, "retrieve": "wado"}, "pacs.p.retrieve"),
        ({**DIMSE, "retrieve": "c-find"}, "pacs.p.retrieve"),
        ({**DIMSE, "retrieve": "c-move", "move_port": 11113}, "pacs.p.move_ae_title"),
        ({**DIMSE, "retrieve": "c-move", "move_ae_title": "US"}, "pacs.p.move_port"),
        ({**MOVE, "move_port": 70000}, "pacs.p.move_port"),
        ({**MOVE, "move_ae_title": "X" * 17}, "pacs.p.move_ae_title"),
        ({**MOVE, "tls": True}, "pacs.p.retrieve"),  # the move SCP is plain DICOM
        ({**DIMSE, "move_port": 11113}, "pacs.p.move_port"),  # only with c-move
        ({**DIMSE, "timeout_s": 0}, "pacs.p.timeout_s"),
    ],
)
def test_bad_retrieve_tables_name_the_key(table: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_destination("p", table)
    assert [v.field for v in info.value.violations] == [field]


def test_budget_is_the_destination_timeout_without_a_deadline() -> None:
    dest = parse_destination("g", {**DIMSE, "timeout_s": 7})
    budget = budget_for(dest, None, "f")
    assert (budget.seconds, budget.by_deadline) == (7.0, False)


def test_a_short_deadline_caps_the_budget_and_keeps_a_reserve() -> None:
    dest = parse_destination("g", {**DIMSE, "timeout_s": 30})
    budget = budget_for(dest, 5.0, "f")
    assert budget.by_deadline
    assert budget.seconds == pytest.approx(4.5)  # a tenth kept back to answer in time
    assert budget.seconds + budget.grace < 5.0
    far = budget_for(dest, 600.0, "f")
    assert (far.seconds, far.by_deadline) == (30.0, False)  # the PACS's own limit binds


def test_the_limit_that_binds_picks_the_code() -> None:
    dest = parse_destination("g", {**DIMSE, "timeout_s": 30})
    assert isinstance(budget_for(dest, 5.0, "f").expired(dest, "f", "x"), DeadlineExceeded)
    assert isinstance(budget_for(dest, 600.0, "f").expired(dest, "f", "x"), Unavailable)
    error = budget_for(dest, 5.0, "images[0].pacs").expired(dest, "images[0].pacs", "C-GET")
    assert error.reason == "PACS_DEADLINE_EXCEEDED"
    assert error.metadata == {"field": "images[0].pacs", "pacs": "g"}


def test_a_spent_deadline_refuses_before_any_network() -> None:
    dest = parse_destination("g", DIMSE)  # host "h" resolves nowhere: never contacted
    with pytest.raises(DeadlineExceeded, match="no time to fetch"):
        budget_for(dest, 0.04, "f")
    with pytest.raises(DeadlineExceeded):
        budget_for(dest, -1.0, "f")
