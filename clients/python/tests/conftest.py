"""Fixtures for the end-to-end tests: a real `redis-server` on a free port and the real `cachegw`
binary (`$CACHEGW_BIN`, else built with cargo) serving on port 0, its address read from its log.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachegw import CacheClient

REPO = Path(__file__).resolve().parents[3]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cachegw_binary() -> str:
    if os.environ.get("CACHEGW_BIN"):
        return os.environ["CACHEGW_BIN"]
    subprocess.run(["cargo", "build", "-p", "gateway", "--bin", "cachegw"], cwd=REPO, check=True)
    return str(REPO / "target" / "debug" / "cachegw")


class RedisServer:
    """A `redis-server` owned by the test session, persisting nothing."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH (Debian: apt-get install redis-server)")
        self.dir = tempfile.TemporaryDirectory(prefix="cachegw-py-redis-")
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._pong, 10, f"redis-server on port {self.port} to answer PING")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.dir.cleanup()


class Gateway:
    """A running `cachegw serve` (every listener on port 0) and the data address it logged."""

    def __init__(self, *args: str, auth: bool = False) -> None:
        command = [cachegw_binary(), "serve", "--listen", "127.0.0.1:0",
                   "--admin-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *args]
        if not auth:
            command.append("--no-auth")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEGW_")}
        env["CACHEGW_LOG"] = "info"
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            cwd=tempfile.gettempdir(), env=env,
        )
        self.log: list[str] = []
        self._found = threading.Event()
        self.addr = ""
        threading.Thread(target=self._read_log, daemon=True).start()
        wait_until(lambda: self._found.is_set() or self.process.poll() is not None, 30,
                   "cachegw to log 'cachegw serving ... addr='")
        if not self._found.is_set():
            raise AssertionError(f"{command[0]} exited with {self.process.returncode} before "
                                 "serving:\n" + "\n".join(self.log[-20:]))

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = ANSI.sub("", raw.rstrip("\n"))
            self.log.append(line)
            if not self._found.is_set() and "cachegw serving" in line and "addr=" in line:
                self.addr = line.split("addr=", 1)[1].split()[0]
                self._found.set()

    def stop(self) -> None:
        """SIGTERM, and wait for a clean exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(15) == 0, "\n".join(self.log[-20:])


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(redis_server: RedisServer) -> Iterator[Gateway]:
    """One gateway on the session's Redis, shared by the tests that do not stop it."""
    gw = Gateway("--redis", redis_server.url)
    yield gw
    gw.stop()


@pytest.fixture
def own_gateway() -> Iterator[Gateway]:
    """A gateway of the test's own (in-process store), free to stop."""
    gw = Gateway("--store", "memory")
    yield gw
    if gw.process.poll() is None:
        gw.process.kill()
    gw.process.wait(10)


@pytest.fixture
def client(gateway: Gateway) -> Iterator[CacheClient]:
    with CacheClient(gateway.addr, namespace="pytest", timeout=5.0) as c:
        yield c


@pytest.fixture
def unique() -> str:
    """A string no other test (or earlier run on the same Redis) uses: keys stay cold."""
    return f"{time.time_ns()}-{os.getpid()}"


@pytest.fixture
def auth_gateway(tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    token = "pytest-token-" + "x" * 24
    config = tmp_path / "cachegw.toml"
    config.write_text(
        "[auth.tenants.t]\n"
        f'token_sha256 = ["{hashlib.sha256(token.encode()).hexdigest()}"]\n'
        'namespaces = { ns = ["read", "write", "invalidate"] }\n'
    )
    gw = Gateway("--config", str(config), "--store", "memory", auth=True)
    yield gw, token
    gw.stop()
