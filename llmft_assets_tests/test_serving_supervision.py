"""Kill tests: the worker never outlives `make serve` / `bentoml serve`, the port is free for the
next start, and a SIGKILL-ed worker loses no answered request from the request log."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from llmft_assets.serving.request_log import read_request_logs
from llmft_assets.storage import open_storage
from llmft_assets_tests.servers import LOOPBACK, bentoml_serve_command, free_port, start_process
from llmft_assets_tests.test_serving_service import REPO_ROOT, server_env

pytestmark = pytest.mark.slow

API_KEY = "sup-" + uuid.uuid4().hex
RATE = 40.0  # requests per second during the crash


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def worker_pids(root_pid: int) -> list[int]:
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in children if "_bentoml_impl.worker" in " ".join(c.cmdline())]


class Load:
    """Paced requests from a few threads; records the ids of the answered ones."""

    def __init__(self, base_url: str, rate: float, threads: int = 6) -> None:
        self.base_url, self.interval, self.threads = base_url, threads / rate, threads
        self.answered: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        time.sleep(self.interval * index / self.threads)
        with httpx.Client(timeout=3) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post(
                        f"{self.base_url}/v1/chat/completions",
                        json={
                            "model": "llmft-chat",
                            "messages": [{"role": "user", "content": "count me"}],
                            "max_tokens": 3,
                        },
                        headers={"Authorization": f"Bearer {API_KEY}"},
                    )
                    if response.status_code == 200:
                        self.answered.append(response.json()["id"])
                    else:
                        self.failed += 1
                except httpx.HTTPError:
                    self.failed += 1
                time.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> Load:
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=20)


def test_kills_free_the_port_and_lose_no_answered_request(tmp_path: Path) -> None:
    from llmft_assets.modeling.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", pretrain_steps=0)
    port = free_port()
    bentoml = bentoml_serve_command(port)
    # `make serve` as a user runs it: make is the process group leader, bentoml its child.
    makefile = tmp_path / "Makefile"
    makefile.write_text("serve:\n\t" + " ".join(bentoml) + "\n")
    env = server_env(
        tmp_path,
        model_dir,
        LLMFT_API_KEY=API_KEY,
        # Nothing reaches storage by the interval during the test: only the spool can save the rows.
        LLMFT_REQUEST_LOG_FLUSH_S="600",
    )
    base_url = f"http://{LOOPBACK}:{port}"
    make = start_process(
        ["make", "-s", "-f", str(makefile), "serve"],
        f"{base_url}/readyz",
        timeout=180,
        env=env,
        cwd=REPO_ROOT,
        log_path=tmp_path / "make-serve.log",
    )
    try:
        (worker,) = worker_pids(make.pid)
        load = Load(base_url, RATE).start()
        time.sleep(4.0)
        os.kill(worker, signal.SIGKILL)  # the crash: no shutdown hook runs
        time.sleep(1.0)
        load.stop()
        answered = list(load.answered)
        # 40 req/s is asked for; a loaded 2-core machine may answer fewer, which is still a crash test.
        assert len(answered) >= 40, f"only {len(answered)} answered before the kill"
        # Now the group leader only: bentoml and any respawned worker must follow it.
        os.kill(make.pid, signal.SIGKILL)
        assert wait_until(lambda: port_is_free(port), 30), (
            f"port still held after make was killed: {_holders(port)}\n"
            + "\n".join(line for line in make.log_tail(200_000).splitlines() if "POST" not in line)[-3000:]
        )
        assert wait_until(lambda: not worker_pids(make.pid) and not _listeners(port), 30)
    finally:
        make.stop()

    # A restart on the same port works and ships what the killed worker had spooled.
    serve = start_process(
        bentoml, f"{base_url}/readyz", timeout=180, env=env, cwd=REPO_ROOT, log_path=tmp_path / "serve2.log"
    )
    try:
        storage = open_storage(str(tmp_path / "storage"))
        logged: set[str] = set()

        def all_logged() -> bool:
            logged.update(read_request_logs(storage).column("request_id").to_pylist())
            return set(answered) <= logged

        wait_until(all_logged, 20)
        lost = len(set(answered) - logged)
        print(f"crash test: {len(answered)} answered in ~5 s, {lost} missing from the request log")
        assert lost <= 0.01 * len(answered), (
            f"{lost} of {len(answered)} answered requests missing from the log"
        )
        (worker,) = worker_pids(serve.pid)
        os.kill(serve.pid, signal.SIGKILL)  # the arbiter dies; its worker must not serve on
        assert wait_until(
            lambda: not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie", 30
        )
        assert wait_until(lambda: port_is_free(port), 10)
    finally:
        serve.stop()


def _listeners(port: int) -> bool:
    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
        for c in psutil.net_connections(kind="tcp")
    )


def _holders(port: int) -> list[str]:
    """Diagnostics for a failure: who still has the port, and every serve process left."""
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "bentoml" in cmdline or "_bentoml_impl" in cmdline:
            found.append(f"{proc.info['pid']}<-{proc.info['ppid']}: {cmdline[:120]}")
    found += [str(c) for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port]
    return found
