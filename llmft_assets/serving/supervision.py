"""Keep the model server's processes tied together, and slow clients from holding connections.

`bentoml serve` is an arbiter (circus) that starts the worker in a session of its own, so killing
the arbiter (or `make serve` above it) used to leave the worker serving on the port, orphaned, and
the next start failed with "address already in use". Two watchdogs close that gap:

- the worker watches its parent (the arbiter) and shuts down when it is gone;
- the arbiter (the `bentoml serve` CLI) watches the ancestors in its own process group (`make serve`
  runs it in make's group) and shuts down when one of them is gone. A shell that started
  `bentoml serve` as a job is in another group and is not watched, so `nohup ... &` still works.

`HeaderTimeoutProtocol` is uvicorn's httptools protocol with a deadline on the request head: a
client that opens a connection (or starts a request) and does not finish its headers in time gets
a 408 and is disconnected, instead of holding a connection slot for ever (slowloris).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("bentoml.llmft.serving")

WATCH_INTERVAL_S = 0.5
HEADER_TIMEOUT_ENV = "LLMFT_HEADER_TIMEOUT_S"


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # Field 4 follows the command name, which is in parentheses and may hold spaces.
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def same_group_ancestors(pid: int | None = None) -> list[int]:
    """Ancestors of `pid` (default: this process) that share its process group, nearest first."""
    pid = os.getpid() if pid is None else pid
    group = _process_group(pid)
    ancestors: list[int] = []
    parent = _parent_of(pid)
    while parent and parent > 1 and _process_group(parent) == group:
        ancestors.append(parent)
        parent = _parent_of(parent)
    return ancestors


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc: the signal check above is all we have


def watch_processes(
    watched: list[int],
    on_gone: Callable[[int], None],
    *,
    parent_must_stay: bool = True,
    interval_s: float = WATCH_INTERVAL_S,
) -> threading.Thread:
    """Call `on_gone(pid)` once, from a daemon thread, when a watched pid dies or we are reparented."""
    original_parent = os.getppid()

    def run() -> None:
        while True:
            time.sleep(interval_s)
            if parent_must_stay and os.getppid() != original_parent:
                on_gone(original_parent)
                return
            for pid in watched:
                if not _alive(pid):
                    on_gone(pid)
                    return

    thread = threading.Thread(target=run, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def terminate_self(grace_s: float, before_exit: Callable[[], None] | None = None) -> Callable[[int], None]:
    """An `on_gone` that asks this process to stop (SIGTERM) and forces it after `grace_s`."""

    def on_gone(pid: int) -> None:
        logger.warning("process %d is gone; shutting this server process down", pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        if before_exit is not None:
            try:
                before_exit()
            except Exception:
                logger.exception("cleanup before exit failed")
        os._exit(1)

    return on_gone


def watch_arbiter(arbiter_pid: int | None = None, grace_s: float = 10.0) -> threading.Thread:
    """In the worker: stop when the arbiter dies.

    `arbiter_pid` (passed down in ARBITER_PID_ENV) covers a worker whose arbiter died while it was
    still starting: it is then already reparented, and its parent pid alone would not tell.
    """
    if arbiter_pid is None:
        return watch_processes([], terminate_self(grace_s), parent_must_stay=True)
    return watch_processes([arbiter_pid], terminate_self(grace_s), parent_must_stay=False)


def watch_launcher(grace_s: float = 15.0) -> threading.Thread | None:
    """In the `bentoml serve` CLI: stop when an ancestor in our process group (make) dies."""
    ancestors = same_group_ancestors()
    if not ancestors:
        return None
    # Our parent is one of them (same group): being reparented also means it died.
    return watch_processes(ancestors, terminate_self(grace_s), parent_must_stay=True)


ARBITER_PID_ENV = "LLMFT_SERVE_ARBITER_PID"  # set by the CLI process, inherited by its workers


def supervise_serve_process(is_cli: bool) -> None:
    """Start the right watchdog for this process of `bentoml serve` (called at service import)."""
    if is_cli:
        os.environ[ARBITER_PID_ENV] = str(os.getpid())
        watch_launcher()
        return
    from llmft_assets import settings

    arbiter = settings.get().serve_arbiter_pid
    if arbiter is not None and arbiter != os.getpid():
        watch_arbiter(arbiter)


# ---------------------------------------------------------------------------------------------
# Request-head deadline for uvicorn
# ---------------------------------------------------------------------------------------------


def header_timeout_s() -> float:
    from llmft_assets import settings

    return settings.get().header_timeout_s


def _header_timeout_protocol() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc]
        """HttpToolsProtocol with a deadline from connection (or request start) to the end of the head."""

        _head_timer: Any = None

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s(), self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def install_header_timeout() -> bool:
    """Make uvicorn's default ("auto") HTTP protocol the one with a head deadline.

    Called when the service module is imported in the worker, before BentoML builds its
    uvicorn.Config. Returns False (and changes nothing) when httptools is not installed.
    """
    try:
        import uvicorn.config
        import uvicorn.protocols.http.httptools_impl  # needs httptools
    except ImportError:
        return False
    global HeaderTimeoutProtocol
    HeaderTimeoutProtocol = _header_timeout_protocol()
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeaderTimeoutProtocol"
    return True


HeaderTimeoutProtocol: type | None = None
