"""Start and stop real server processes (mlflow, moto) on loopback for tests.

Every server is started in its own process group on 127.0.0.1 and a free port, polled until it
answers HTTP, and stopped by its own process group id: never by name, so nothing we did not start
is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS reports free right now (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A started server: its process (group leader), the readiness URL and its log file."""

    process: subprocess.Popen[bytes]
    ready_url: str
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return ""

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the server's own process group, SIGKILL it after the grace period."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=grace_seconds)
        else:
            # The leader is gone; its workers (gunicorn/uvicorn children) may still be alive.
            _signal_group(self.process.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # The process was started with start_new_session=True, so its pid is its own group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 500
    except urllib.error.HTTPError as error:
        # Any HTTP answer below 500 (a 404 on "/" for instance) means the server is up.
        return error.code < 500
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_process(
    cmd: Sequence[str],
    ready_url: str,
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> ServerProcess:
    """Start ``cmd`` in a new process group and wait until ``ready_url`` answers HTTP.

    Raises RuntimeError (with the server's log tail) if it exits early or is not ready in time;
    the process group is stopped before raising.
    """
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix="llmft-server-", suffix=".log")
        os.close(handle)
        log_path = name
    log_path = Path(log_path)
    log_file = log_path.open("wb")
    process_env = dict(os.environ if env is None else env)
    process = subprocess.Popen(
        list(cmd),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=process_env,
        cwd=cwd,
        start_new_session=True,
    )
    server = ServerProcess(process=process, ready_url=ready_url, log_path=log_path, _log_file=log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(
                f"{cmd[0]} exited with code {process.returncode} before it was ready:\n{server.log_tail()}"
            )
        if _answers_http(ready_url):
            return server
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{cmd[0]} not ready at {ready_url} after {timeout:.0f}s:\n{server.log_tail()}")


def _executable(name: str) -> str:
    """Prefer the executable next to the running interpreter (the project venv), then PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed in {Path(sys.executable).parent} nor on PATH")
    return found


SERVICE = "bentos.service:LLMChatService"


def bentoml_serve_command(port: int, target: str = SERVICE, host: str = LOOPBACK) -> list[str]:
    """`bentoml serve` of the model server (or of a built bento, `target`) on host:port."""
    return [_executable("bentoml"), "serve", target, "--host", host, "--port", str(port)]


def start_bentoml_serve(
    port: int,
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str],
    log_path: str | os.PathLike[str],
    target: str = SERVICE,
    timeout: float = 180,
) -> ServerProcess:
    """`bentoml serve` in its own process group, returned once /readyz answers."""
    return start_process(
        bentoml_serve_command(port, target),
        f"http://{LOOPBACK}:{port}/readyz",
        timeout=timeout,
        env=env,
        cwd=cwd,
        log_path=log_path,
    )


@contextlib.contextmanager
def mlflow_server(tmp_path: str | os.PathLike[str], timeout: float = 90.0) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, proxied artifacts under tmp_path); yields its URI."""
    root = Path(tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        _executable("mlflow"),
        "server",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    env = dict(os.environ)
    # The job runner doubles start time and process count; tests do not need it.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    uri = f"http://{LOOPBACK}:{port}"
    server = start_process(cmd, f"{uri}/health", timeout, env=env, log_path=root / "mlflow-server.log")
    try:
        yield uri
    finally:
        server.stop()


@contextlib.contextmanager
def moto_server(timeout: float = 30.0) -> Iterator[str]:
    """A real ``moto_server`` (in-memory S3 and friends); yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    server = start_process(
        [_executable("moto_server"), "-H", LOOPBACK, "-p", str(port)],
        f"{endpoint}/moto-api/",
        timeout,
    )
    try:
        yield endpoint
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            server.log_path.unlink()
