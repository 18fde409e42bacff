"""A private, throwaway ``redis-server`` for tests (never the shared one on 6379).

Usage (``/work/main`` is on ``sys.path`` through the editable install, and ``tests`` is a
namespace package, so this import works from any test folder)::

    from tests.redis_server import RedisServer, redis_server_binary

    with RedisServer() as server:          # free port, no persistence, temp dir
        url = server.url(prefix="t1")      # redis://127.0.0.1:<port>/0?prefix=t1

Call :func:`redis_server_binary` first and ``pytest.skip`` when it returns ``None``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import urlencode

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_POLL = 0.02


def redis_server_binary() -> str | None:
    """Path of the ``redis-server`` executable, or ``None`` when it is not installed."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ping(port: int, timeout: float = 0.5) -> bool:
    """``True`` when a Redis server answers ``PING`` on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` subprocess on a free port of 127.0.0.1, without persistence."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or redis_server_binary()
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, db: int = 0, **query: str | int | float) -> str:
        """``redis://127.0.0.1:<port>/<db>`` with ``query`` (``prefix=...``, ``history=...``)."""
        base = f"redis://{self.host}:{self.port}/{db}"
        return f"{base}?{urlencode(query)}" if query else base

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start the server and wait (at most ``timeout`` seconds) until it answers ``PING``."""
        if self.binary is None:
            raise FileNotFoundError("redis-server is not installed")
        if self.process is not None:
            return self
        self._dir = tempfile.mkdtemp(prefix="rtlab-redis-")
        last_error = ""
        for _attempt in range(3):  # the free port may be taken before the server binds it
            self.port = free_port()
            log = Path(self._dir) / f"redis-{self.port}.log"
            if self._spawn_and_wait(log, timeout):
                return self
            last_error = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self._kill()
        self.stop()
        raise RuntimeError(f"redis-server did not start within {timeout} s:\n{last_error}")

    def restart(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Stop the server and start an empty one on the same port (a crash, without data)."""
        if self.binary is None or self._dir is None:
            raise RuntimeError("the server is not running")
        self._kill()
        log = Path(self._dir) / f"redis-{self.port}-restarted.log"
        if self._spawn_and_wait(log, timeout):
            return self
        output = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self._kill()
        raise RuntimeError(f"redis-server did not restart within {timeout} s:\n{output}")

    def _spawn_and_wait(self, log: Path, timeout: float) -> bool:
        """Run redis-server on ``self.port``; ``True`` once it answers ``PING`` in time."""
        assert self.binary is not None
        assert self._dir is not None
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir,
                "--logfile", str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if ping(self.port):
                return True
            time.sleep(_POLL)
        return False

    def _kill(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        else:
            process.wait()

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers) and remove its directory."""
        self._kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
