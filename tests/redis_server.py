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
from typing import Any
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
            self.cluster_port = free_port() if self.cluster else 0
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


def redis_cli_binary() -> str | None:
    """Path of the ``redis-cli`` executable, or ``None`` when it is not installed."""
    found = shutil.which("redis-cli")
    if found:
        return found
    return "/usr/bin/redis-cli" if os.access("/usr/bin/redis-cli", os.X_OK) else None


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

    def start(self, timeout: float = 60.0) -> RedisClusterServers:
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
        """Wait until every node (of ``ports``) says ``cluster_state:ok`` and knows all slots."""
        deadline = time.monotonic() + timeout
        for port in ports if ports is not None else self.ports:
            while True:
                info = cluster_info(port)
                if info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == "16384":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster is not ok within {timeout} s: {info}")
                time.sleep(0.05)

    def wait_replicas(self, timeout: float = 30.0) -> None:
        """Wait until every primary has its replicas online (synchronized, streaming)."""
        deadline = time.monotonic() + timeout
        while True:
            ranges = _cluster_slots(self.ports[0])
            if ranges:
                online = True
                for primary in {r[2] for r in ranges}:
                    with _client(primary) as client:
                        info = client.info("replication")
                    slaves = [v for k, v in info.items() if k.startswith("slave")]
                    online &= (
                        sum(1 for v in slaves if isinstance(v, dict) and v.get("state") == "online")
                        >= self.replicas
                    )
                if online:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster's replicas are not online within {timeout} s")
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


def _client(port: int) -> Any:
    import redis  # the test helper needs redis-py only where a cluster is driven

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)


def _cluster_slots(port: int) -> list[tuple[int, int, int, list[int]]]:
    """``(first, last, primary port, replica ports)`` of every slot range, asked of ``port``."""
    with _client(port) as client:
        ranges = client.execute_command("CLUSTER SLOTS")
    out = []
    for item in ranges:
        if isinstance(item, dict):  # a parsed answer (newer redis-py)
            continue
        first, last, primary, *replicas = item
        out.append((int(first), int(last), int(primary[1]), [int(r[1]) for r in replicas]))
    return out


class ClusterControl:
    """Slot moves and failovers on a :class:`RedisClusterServers` (blocking: run in a thread)."""

    def __init__(self, cluster: RedisClusterServers) -> None:
        self.cluster = cluster

    def alive_ports(self) -> list[int]:
        return [n.port for n in self.cluster.nodes if n.process is not None and ping(n.port)]

    def owner(self, slot: int) -> int:
        """The port of the primary serving ``slot`` (as the first live node says)."""
        for first, last, primary, _replicas in _cluster_slots(self.alive_ports()[0]):
            if first <= slot <= last:
                return primary
        raise LookupError(f"slot {slot} is not served")

    def replicas_of(self, port: int) -> list[int]:
        """The ports of the replicas streaming from the primary on ``port`` (its own word)."""
        with _client(port) as client:
            info = client.info("replication")
        return [
            int(v["port"])
            for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        ]

    def primaries(self) -> list[int]:
        return sorted({primary for _f, _l, primary, _r in _cluster_slots(self.alive_ports()[0])})

    def node_id(self, port: int) -> str:
        with _client(port) as client:
            return str(client.execute_command("CLUSTER MYID").decode())

    def migrate_slot(self, slot: int, target: int, batch: int = 10) -> None:
        """Move ``slot`` and its keys to the primary on ``target`` (``redis-cli --cluster
        reshard``'s steps: IMPORTING, MIGRATING, MIGRATE in batches, SETSLOT NODE)."""
        source = self.owner(slot)
        if source == target:
            return
        source_id, target_id = self.node_id(source), self.node_id(target)
        with _client(source) as src, _client(target) as dst:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch):
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
            dst.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        for port in self.primaries():
            if port not in (source, target):
                with _client(port) as other:
                    other.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.cluster.nodes if n.port == port)
