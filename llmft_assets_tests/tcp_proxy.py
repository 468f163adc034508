"""A small threaded TCP proxy on loopback that can take an upstream server "down" on demand.

Fault tests put it between the code under test and a real server (moto_server for S3): restarting
moto itself would wipe its in-memory buckets, while stopping the proxy looks exactly like the server
going away to the client (connection refused, live connections reset) and keeps the data.

Faults are armed by HTTP request line (method + path regex), so a test can say "cut the connection
when the PUT of the first file of a new dataset_splits version arrives" instead of guessing timings:

    with TcpProxy("127.0.0.1", moto_port) as proxy:
        fault = proxy.arm(Fault("PUT", r"/assets/dataset_splits/[0-9a-f]+/", action="cut"))
        ...                          # start the writer against proxy.url
        fault.triggered.wait(60)     # the proxy went down in the middle of that upload
        proxy.start()                # back on the same port
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Literal

LOOPBACK = "127.0.0.1"
_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]\r\n")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_EXPECT_CONTINUE = re.compile(rb"\r\nexpect:\s*100-continue", re.IGNORECASE)
_CHUNK = 64 * 1024


@dataclass
class Fault:
    """What to do with the next `times` requests whose method and path match.

    action="cut": forward the request's first chunk (its headers), then stop the proxy: the listener
    closes (new connections are refused) and every live connection is reset, so the request's body
    never arrives. action="hold": never forward that chunk; the connection hangs until the client
    gives up or `TcpProxy.release()` drops it (a writer stuck mid-upload, e.g. to be killed there).
    action="reset": reset that one connection (RST) and keep serving others, as a server does that
    crashes and comes straight back.
    action="respond": answer with `status` and an S3 error body instead of the server, as S3 does
    when it throttles (503 SlowDown) or a load balancer does while the server behind it restarts.
    """

    method: str
    path_pattern: str
    action: Literal["cut", "hold", "reset", "respond"] = "cut"
    times: int = 1
    status: int = 503
    error_code: str = "SlowDown"
    triggered: threading.Event = field(default_factory=threading.Event)
    matched_path: str | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.search(self.path_pattern, path) is not None


@dataclass
class ProxyStats:
    connections: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()

    def abort(self) -> None:
        """Reset both sides (RST, not FIN): what a client sees when the server host goes away."""
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump threads blocked in recv
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to upstream; `stop()`/`start()` take it down and back on the same port."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.port = listen_port
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._faults: list[Fault] = []
        self._held: list[_Connection] = []

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Listen (again); the first start picks a free port, later ones reuse it."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # Rebinding the same port right after a stop must not fail on TIME_WAIT sockets.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((LOOPBACK, self.port))
            listener.listen(64)
            self.port = listener.getsockname()[1]
            self._listener = listener
            self._accept_thread = threading.Thread(
                target=self._accept_loop, args=(listener,), name=f"tcp-proxy-{self.port}", daemon=True
            )
            self._accept_thread.start()

    def stop(self) -> None:
        """Refuse new connections and reset every live one."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections = list(self._connections)
            self._connections.clear()
            self._held.clear()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for connection in connections:
            connection.abort()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout=5)

    def arm(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def release(self) -> None:
        """Reset the connections a "hold" fault is sitting on."""
        with self._lock:
            held, self._held = self._held, []
        for connection in held:
            connection.abort()

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------- internals

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by stop()
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # upstream itself is down: the client sees a reset connection
                continue
            connection = _Connection(client, upstream)
            with self._lock:
                if self._listener is not listener:  # stopped while we were connecting
                    connection.abort()
                    return
                self._connections.add(connection)
                self.stats.connections += 1
            threading.Thread(target=self._pump_requests, args=(connection,), daemon=True).start()
            threading.Thread(target=self._pump_responses, args=(connection,), daemon=True).start()

    def _fault_for(self, chunk: bytes) -> Fault | None:
        match = _REQUEST_LINE.search(chunk)
        if match is None:
            return None
        method, path = match.group(1).decode(), match.group(2).decode(errors="replace")
        with self._lock:
            self.stats.requests.append((method, path))
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.matched_path = path
                    fault.hits += 1
                    if fault.hits >= fault.times:
                        self._faults.remove(fault)
                    return fault
        return None

    def _pump_requests(self, connection: _Connection) -> None:
        try:
            while not connection.closed.is_set():
                chunk = connection.client.recv(_CHUNK)
                if not chunk:
                    break
                fault = self._fault_for(chunk)
                if fault is None:
                    connection.upstream.sendall(chunk)
                elif fault.action == "cut":
                    connection.upstream.sendall(chunk)  # headers reach the server, the body never does
                    fault.triggered.set()
                    self.stop()
                    return
                elif fault.action == "reset":
                    fault.triggered.set()
                    break  # _forget() below resets both sides
                elif fault.action == "respond":
                    self._respond(connection, chunk, fault)
                    fault.triggered.set()
                    break
                else:
                    with self._lock:
                        self._held.append(connection)
                    fault.triggered.set()
                    connection.closed.wait()  # until release(), stop() or the client hangs up
                    return
        except OSError:
            pass
        self._forget(connection)

    def _respond(self, connection: _Connection, chunk: bytes, fault: Fault) -> None:
        """Answer the request ourselves, after taking in its body unless the client waits for 100."""
        head, _, body = chunk.partition(b"\r\n\r\n")
        if _EXPECT_CONTINUE.search(head) is None:
            length_match = _CONTENT_LENGTH.search(head)
            remaining = (int(length_match.group(1)) if length_match else 0) - len(body)
            while remaining > 0:
                data = connection.client.recv(min(_CHUNK, remaining))
                if not data:
                    return
                remaining -= len(data)
        payload = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{fault.error_code}</Code>'
            f"<Message>injected by the test proxy</Message></Error>"
        ).encode()
        connection.client.sendall(
            f"HTTP/1.1 {fault.status} Injected\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )

    def _pump_responses(self, connection: _Connection) -> None:
        try:
            while not connection.closed.is_set():
                chunk = connection.upstream.recv(_CHUNK)
                if not chunk:
                    break
                connection.client.sendall(chunk)
        except OSError:
            pass
        self._forget(connection)

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
            if connection in self._held:
                self._held.remove(connection)
        connection.abort()
