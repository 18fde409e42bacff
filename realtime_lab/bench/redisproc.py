"""Private, throwaway Redis servers: one ``redis-server``, or a local Redis Cluster.

The benchmark's ``--bus redis`` and ``--bus cluster`` points run on these, and so do the test
suite's Redis fixtures (``tests/redis_server.py`` re-exports this module): never the shared
server on 6379. Every server binds 127.0.0.1 on a free port, keeps nothing on disk (no RDB, no
AOF) and lives in a temporary directory removed when it stops::

    with RedisServer() as server:              # free port, no persistence, temp dir
        url = server.url(prefix="t1")          # redis://127.0.0.1:<port>/0?prefix=t1
    with RedisClusterServers(primaries=3, replicas=0) as cluster:
        url = cluster.url()                    # redis+cluster://127.0.0.1:<p1>,.../

Call :func:`redis_server_binary` (and :func:`redis_cli_binary` for a cluster) first: ``None``
means not installed, and the caller skips or says so. :meth:`RedisServer.pids` and
:meth:`RedisClusterServers.pids` are what :func:`realtime_lab.bench.server.cpu_seconds` reads
to charge Redis its CPU.
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
from typing import Any
from urllib.parse import urlencode

from realtime_lab.bench.server import free_port, stop_process
from realtime_lab.errors import RealtimeLabError

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_POLL = 0.02


class RedisStartError(RealtimeLabError, RuntimeError):
    """A private redis-server (or cluster) did not start, or is not running."""


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    path = f"/usr/bin/{name}"
    return path if os.access(path, os.X_OK) else None


def redis_server_binary() -> str | None:
    """Path of the ``redis-server`` executable, or ``None`` when it is not installed."""
    return _binary("redis-server")


def redis_cli_binary() -> str | None:
    """Path of the ``redis-cli`` executable, or ``None`` when it is not installed."""
    return _binary("redis-cli")


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

    def __init__(
        self,
        binary: str | None = None,
        extra_args: list[str] | None = None,
        *,
        cluster: bool = False,
    ) -> None:
        self.binary = binary or redis_server_binary()
        self.extra_args = list(extra_args or [])
        self.cluster = cluster  # a cluster node: its bus port is a second free port
        self.cluster_port = 0
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

    def pids(self) -> list[int]:
        """The server's process id (empty when it is not running)."""
        return [] if self.process is None else [self.process.pid]

    def flush(self) -> None:
        """Drop every key (``FLUSHALL``): the next run starts on an empty server."""
        with redis_client(self.port) as client:
            client.flushall()

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start the server and wait (at most ``timeout`` seconds) until it answers ``PING``.

        Raises:
            FileNotFoundError: redis-server is not installed.
            RedisStartError: it exited or never answered (its log's tail is in the message).
        """
        if self.binary is None:
            raise FileNotFoundError("redis-server is not installed")
        if self.process is not None:
            return self
        self._dir = tempfile.mkdtemp(prefix="rtlab-redis-")
        last_error = ""
        for _attempt in range(3):  # the free port may be taken before the server binds it
            self.port = free_port()
            self.cluster_port = free_port() if self.cluster else 0
            log = Path(self._dir) / f"redis-{self.port}.log"
            if self._spawn_and_wait(log, timeout):
                return self
            last_error = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self._kill()
        self.stop()
        raise RedisStartError(f"redis-server did not start within {timeout} s:\n{last_error}")

    def restart(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Stop the server and start an empty one on the same port (a crash, without data).

        Raises:
            RedisStartError: it was not running, or did not come back in time.
        """
        if self.binary is None or self._dir is None:
            raise RedisStartError("the server is not running")
        self._kill()
        log = Path(self._dir) / f"redis-{self.port}-restarted.log"
        if self._spawn_and_wait(log, timeout):
            return self
        output = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self._kill()
        raise RedisStartError(f"redis-server did not restart within {timeout} s:\n{output}")

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
                *self.extra_args,
                *(
                    ["--cluster-enabled", "yes", "--cluster-port", str(self.cluster_port)]
                    if self.cluster
                    else []
                ),
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
        stop_process(process, STOP_TIMEOUT)

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


def cluster_info(port: int, timeout: float = 0.5) -> dict[str, str]:
    """``CLUSTER INFO`` of the node on ``127.0.0.1:port`` as a dict (empty when unreachable)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"CLUSTER INFO\r\n")
            data = b""
            while not data.endswith(b"\r\n") or data.count(b"\r\n") < 2:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines()[1:]:
        key, _, value = line.partition(":")
        if value:
            info[key.strip()] = value.strip()
    return info


class RedisClusterServers:
    """A private Redis Cluster: ``primaries`` primaries with ``replicas`` replicas each.

    Every node is a :class:`RedisServer` started with ``--cluster-enabled yes`` on a free port;
    ``redis-cli --cluster create`` joins them, and :meth:`start` returns once every node says
    ``cluster_state:ok``. Use as a context manager; :meth:`url` is the ``redis+cluster://`` URL.
    """

    def __init__(self, primaries: int = 3, replicas: int = 1) -> None:
        self.count = primaries * (1 + replicas)
        self.replicas = replicas
        self.nodes: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def url(self, **query: str | int | float) -> str:
        """``redis+cluster://127.0.0.1:<port>,.../?<query>`` naming every node."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        base = f"redis+cluster://{hosts}/"
        return f"{base}?{urlencode(query)}" if query else base

    def pids(self) -> list[int]:
        """The process ids of every running node, primaries and replicas."""
        return [pid for node in self.nodes for pid in node.pids()]

    def flush(self) -> None:
        """``FLUSHALL`` on every primary (replicas follow): the next run starts empty."""
        for primary in {r[2] for r in cluster_slots(self.ports[0])}:
            with redis_client(primary) as client:
                client.flushall()

    def start(self, timeout: float = 60.0) -> RedisClusterServers:
        """Start the nodes, join them, wait until the cluster and its replicas are ready.

        Raises:
            FileNotFoundError: redis-server or redis-cli is not installed.
            RedisStartError: a node did not start, or the cluster was not ready in time.
            subprocess.CalledProcessError: ``redis-cli --cluster create`` failed.
        """
        cli = redis_cli_binary()
        if cli is None:
            raise FileNotFoundError("redis-cli is not installed")
        # A replica syncs at once (no 5 s wait for more replicas to share a diskless sync).
        extra = ["--cluster-node-timeout", "1000", "--repl-diskless-sync-delay", "0"]
        try:
            for _ in range(self.count):
                node = RedisServer(extra_args=extra, cluster=True)
                node.start()
                self.nodes.append(node)
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, timeout=timeout,
            )  # fmt: skip
            self.wait_ok(timeout)
            self.wait_replicas(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0, ports: list[int] | None = None) -> None:
        """Wait until every node (of ``ports``) says ``cluster_state:ok`` and knows all slots.

        Raises:
            RedisStartError: not within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        for port in ports if ports is not None else self.ports:
            while True:
                info = cluster_info(port)
                if info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == "16384":
                    break
                if time.monotonic() > deadline:
                    raise RedisStartError(f"the cluster is not ok within {timeout} s: {info}")
                time.sleep(0.05)

    def wait_replicas(self, timeout: float = 30.0) -> None:
        """Wait until every primary has its replicas online (synchronized, streaming).

        Raises:
            RedisStartError: not within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            ranges = cluster_slots(self.ports[0])
            if ranges:
                online = True
                for primary in {r[2] for r in ranges}:
                    with redis_client(primary) as client:
                        info = client.info("replication")
                    slaves = [v for k, v in info.items() if k.startswith("slave")]
                    online &= (
                        sum(1 for v in slaves if isinstance(v, dict) and v.get("state") == "online")
                        >= self.replicas
                    )
                if online:
                    return
            if time.monotonic() > deadline:
                raise RedisStartError(f"the cluster's replicas are not online within {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every node (all told at once, then waited for)."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            node.stop()
        self.nodes.clear()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def redis_client(port: int) -> Any:
    """A blocking redis-py client of ``127.0.0.1:port`` (close it: use it with ``with``)."""
    import redis  # only where a server is driven, not on import of the bench

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)


def cluster_slots(port: int) -> list[tuple[int, int, int, list[int]]]:
    """``(first, last, primary port, replica ports)`` of every slot range, asked of ``port``."""
    with redis_client(port) as client:
        ranges = client.execute_command("CLUSTER SLOTS")
    out = []
    for item in ranges:
        if isinstance(item, dict):  # a parsed answer (newer redis-py)
            continue
        first, last, primary, *replicas = item
        out.append((int(first), int(last), int(primary[1]), [int(r[1]) for r in replicas]))
    return out


__all__ = [
    "RedisClusterServers",
    "RedisServer",
    "RedisStartError",
    "cluster_info",
    "cluster_slots",
    "free_port",
    "ping",
    "redis_cli_binary",
    "redis_client",
    "redis_server_binary",
]
