"""A real S3-protocol peer for the store tests and drills: moto's ThreadedMotoServer on loopback,
and a TCP forwarder in front of it that can vanish (every connection reset, the port refusing)
and come back on the same address."""

from __future__ import annotations

import contextlib
import socket
import threading

from moto.server import ThreadedMotoServer

_RESET = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")  # linger 0: RST
CREDS = {"access_key": "test-key", "secret_key": "test-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Moto:
    """A ThreadedMotoServer that can be stopped (port closed) and restarted on its port.

    moto keeps buckets in process-global state, so objects survive a restart, which is
    what lets these tests check what a "server" holds after coming back.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        assert self._server is not None
        self._server.stop()
        self._server._server.server_close()  # type: ignore[union-attr]  # refuse, don't queue
        self._server = None


class Proxy:
    """TCP forwarder to the S3 server that can vanish: cut after N upstream bytes, or hang.

    ``cut_after`` simulates a server dying mid-request (connections reset, port closed);
    ``hang`` (set it in the constructor to wedge every connection) accepts connections and
    never answers (a wedged server, to hit read timeouts);
    :meth:`close` takes the endpoint away at once. A new ``Proxy(target, port=old.port)``
    brings it back on the same address.
    """

    def __init__(self, target_port: int, port: int = 0, *, hang: bool = False) -> None:
        self.target_port = target_port
        self._sock = socket.create_server(("127.0.0.1", port))
        self.port = int(self._sock.getsockname()[1])
        self.cut_after: int | None = None
        self.hang = hang
        self._sent = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self._closed.is_set():
                self._reset(client)
                return
            with self._lock:
                self._conns.append(client)
            if self.hang:
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server behind is down: refuse this one, keep accepting
                self._reset(client)
                continue
            with self._lock:
                self._conns.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if counted and self.cut_after is not None:
                    with self._lock:
                        self._sent += len(data)
                        cut = self._sent > self.cut_after
                    if cut:
                        self.close()
                        return
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        # shutdown first: a close() alone leaves the connection open while a pump thread is
        # blocked reading it, and the peer would wait for an answer that never comes.
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        """The server goes away: listener closed, every connection reset."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (Linux)
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            self._reset(conn)
