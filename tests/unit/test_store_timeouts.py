"""How fast an unreachable S3 endpoint fails: the timeout / retry settings and what is retried.

A dropped connection is retried (a pooled keep-alive connection the server closed looks the
same); a read timeout is not (the server has the request; waiting again only pushes the caller
past its deadline). Counted in connections a loopback listener accepts, not in seconds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from clinisynth_server.errors import InvalidArgument, Unavailable
from clinisynth_server.store import open_store
from clinisynth_server.store.s3 import DEFAULT_READ_TIMEOUT_S, S3Store

CREDS = {"access_key": "k", "secret_key": "s"}


class Listener:
    """Accepts connections and either holds them unanswered or drops them at once."""

    def __init__(self, *, drop: bool) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.accepted = 0
        self._drop = drop
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self._drop:
                conn.close()
            else:
                self._held.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def wedged() -> Iterator[Listener]:
    listener = Listener(drop=False)
    yield listener
    listener.close()


@pytest.fixture
def dropping() -> Iterator[Listener]:
    listener = Listener(drop=True)
    yield listener
    listener.close()


def test_read_timeout_is_final_not_retried(wedged: Listener) -> None:
    store = open_store(
        "s3://bucket-one", env={}, endpoint=wedged.endpoint, read_timeout_s=0.3, retries=1, **CREDS
    )
    with pytest.raises(Unavailable, match=r"timed out during put: no answer within 0\.3 s") as err:
        store.put_bytes("k", b"v")
    assert wedged.endpoint in str(err.value)
    assert wedged.accepted == 1


def test_dropped_connection_is_retried(dropping: Listener) -> None:
    store = open_store("s3://bucket-one", env={}, endpoint=dropping.endpoint, retries=1, **CREDS)
    with pytest.raises(Unavailable, match="unreachable during put"):
        store.put_bytes("k", b"v")
    assert dropping.accepted == 2


def test_timeouts_and_retries_from_the_environment() -> None:
    env = {
        "CLINISYNTH_STORE_ENDPOINT": "http://127.0.0.1:9",
        "CLINISYNTH_STORE_CONNECT_TIMEOUT_S": "1.5",
        "CLINISYNTH_STORE_READ_TIMEOUT_S": "2.5",
        "CLINISYNTH_STORE_RETRIES": "0",
    }
    store = open_store("s3://bucket-one", env=env)
    assert isinstance(store, S3Store)
    timeout = store._http.connection_pool_kw["timeout"]
    assert (timeout.connect_timeout, timeout.read_timeout) == (1.5, 2.5)
    assert store._http.connection_pool_kw["retries"].total == 0
    default = open_store("s3://bucket-one", env={"CLINISYNTH_STORE_ENDPOINT": "h:9"})
    assert default._http.connection_pool_kw["timeout"].read_timeout == DEFAULT_READ_TIMEOUT_S
    # An option given in code wins over the environment.
    explicit = open_store("s3://bucket-one", env=env, read_timeout_s=7.0)
    assert explicit._http.connection_pool_kw["timeout"].read_timeout == 7.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CLINISYNTH_STORE_READ_TIMEOUT_S", "0"),
        ("CLINISYNTH_STORE_READ_TIMEOUT_S", "-1"),
        ("CLINISYNTH_STORE_READ_TIMEOUT_S", "nan"),
        ("CLINISYNTH_STORE_CONNECT_TIMEOUT_S", "soon"),
        ("CLINISYNTH_STORE_RETRIES", "1.5"),
        ("CLINISYNTH_STORE_RETRIES", "-1"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        open_store("s3://bucket-one", env={"CLINISYNTH_STORE_ENDPOINT": "h:9", name: value})
    assert err.value.violations[0].field == name
