"""PACS destinations from ``[pacs.NAME]`` tables: both kinds parse, mistakes name their key,
and a request's unknown destination is INVALID_ARGUMENT on ``to_pacs``."""

from __future__ import annotations

import pathlib

import pytest

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.pacs.config import (
    check_destination,
    load_destinations,
    parse_destination,
)
from clinisynth_server.pacs.outbox import Backoff
from clinisynth_server.runtime.config import load_config


def test_toml_tables_become_destinations(tmp_path: pathlib.Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    cfg = tmp_path / "clinisynth.toml"
    cfg.write_text(
        f'[generator]\nport = 1\n\n[pacs.web]\ndicomweb_url = "https://pacs.example/dicom-web/"\n'
        f'token_file = "{token}"\n\n[pacs.dimse]\nhost = "10.0.0.5"\nport = 11112\n'
        'called_ae = "HOSPITAL_PACS"\nae_title = "SYNTH"\ntls = true\n'
    )
    config = load_config("generator", env={"CLINISYNTH_CONFIG": str(cfg)})
    assert config.config_file == str(cfg) and config.port == 1
    dests = load_destinations(config.config_file)
    web, dimse = dests["web"], dests["dimse"]
    assert (web.protocol, web.dicomweb_url, web.token()) == (
        "dicomweb",
        "https://pacs.example/dicom-web",
        "s3cret",
    )
    assert (dimse.protocol, dimse.host, dimse.port, dimse.called_ae, dimse.ae_title, dimse.tls) == (
        "dimse",
        "10.0.0.5",
        11112,
        "HOSPITAL_PACS",
        "SYNTH",
        True,
    )
    assert load_destinations("") == {}


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"dicomweb_url": "ftp://x"}, "pacs.p.dicomweb_url"),
        ({"host": "h", "port": 104}, "pacs.p.called_ae"),
        ({"host": "h", "port": 0, "called_ae": "A"}, "pacs.p.port"),
        ({"host": "h", "port": 104, "called_ae": "A" * 17}, "pacs.p.called_ae"),
        ({"dicomweb_url": "http://x", "host": "h"}, "pacs.p"),
        ({"dicomweb_url": "http://x", "passwrd": "typo"}, "pacs.p"),
    ],
)
def test_bad_tables_name_the_key(table: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_destination("p", table)
    assert [v.field for v in info.value.violations] == [field]


def test_unknown_destination_names_to_pacs_and_lists_known() -> None:
    dests = {"web": parse_destination("web", {"dicomweb_url": "http://x"})}
    assert check_destination("web", dests).name == "web"
    with pytest.raises(InvalidArgument) as info:
        check_destination("nope", dests)
    assert [v.field for v in info.value.violations] == ["to_pacs"]
    assert "web" in str(info.value)


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(base_s=2.0, max_s=10.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
