"""What a service starts beside its servicers stops with it: the PACS outbox worker (generator,
counterfactual) and the review page (reward) — no thread outlives a stopped server."""

from __future__ import annotations

import pathlib
import threading
import time

import pytest

from tests.conftest import start_service


def _alive(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def _gone(name: str, before: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(_alive(name)) <= before:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("service", ["generator", "counterfactual"])
def test_outbox_worker_stops_with_the_server(service: str, tmp_path: pathlib.Path) -> None:
    config = tmp_path / "clinisynth.toml"
    config.write_text('[pacs.nowhere]\ndicomweb_url = "http://127.0.0.1:9/dicom-web"\n')
    before = len(_alive("pacs-outbox"))
    running = start_service(
        service, "127.0.0.1:1", str(tmp_path / "store"), tmp_path, config_file=str(config)
    )
    assert len(_alive("pacs-outbox")) == before + 1
    running.stop(0)
    assert _gone("pacs-outbox", before), "the outbox worker outlived its server"


def test_review_page_stops_with_the_server(tmp_path: pathlib.Path) -> None:
    before = len(_alive("review-http"))
    running = start_service(
        "reward", "127.0.0.1:1", str(tmp_path / "store"), tmp_path, http_port="0"
    )
    assert len(_alive("review-http")) == before + 1
    running.stop(0)
    assert _gone("review-http", before), "the review page outlived its server"
