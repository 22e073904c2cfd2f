"""A local-store write whose temp file can't be removed afterwards (the folder became unwritable
mid-write) keeps its own outcome: the write's UNAVAILABLE, or its success once published.

Tests run as root, for whom permission bits deny nothing, so the refusal comes from a patched
``os.unlink`` / ``os.link`` raising what the kernel raises for another user (EACCES).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from clinisynth_server.errors import Unavailable
from clinisynth_server.store import LocalStore


def _denied(*args: object, **kwargs: object) -> None:
    raise PermissionError(errno.EACCES, "Permission denied", str(args[0]) if args else "")


def test_published_write_stays_a_success_when_cleanup_is_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    monkeypatch.setattr(os, "unlink", _denied)
    assert store.put_if_absent("records/a.json", b"{}") is True  # linked: durable
    monkeypatch.undo()
    assert store.get_bytes("records/a.json") == b"{}"
    assert [i.key for i in store.list()] == ["records/a.json"]  # the stray temp file is hidden


def test_failed_write_stays_unavailable_when_cleanup_is_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("records/old.json", b"1")
    monkeypatch.setattr(os, "link", _denied)
    monkeypatch.setattr(os, "unlink", _denied)
    with pytest.raises(Unavailable, match="Permission denied"):
        store.put_if_absent("records/b.json", b"{}")
    monkeypatch.undo()
    assert not store.exists("records/b.json")
    assert [i.key for i in store.list()] == ["records/old.json"]
