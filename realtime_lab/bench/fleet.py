"""Many connections from one machine: native load client processes over several source addresses.

The publisher and scale scenarios drive the native load client (``loadclient.c``) directly, one
process per core, with its line protocol on stdin/stdout (documented at the top of the C
source). What caps a count on one machine, and what this module checks before opening:

- descriptors: each connection is one in the load client and one in the server. The soft
  ``RLIMIT_NOFILE`` is raised to the hard one (and, as root, both up to what is needed, bounded
  by ``/proc/sys/fs/nr_open``); processes started afterwards inherit it.
- ephemeral ports: one (source address, server address, server port) has only the ports of
  ``/proc/sys/net/ipv4/ip_local_port_range`` (32768-60999: 28,232). Linux routes all of
  ``127.0.0.0/8`` to ``lo``, so connections bound to ``127.0.0.2``, ``127.0.0.3``, ... each have
  a range of their own.

A count over either bound is cut to what fits, and the reason is reported with the figures
instead of a run that fails with ``EMFILE`` or ``EADDRNOTAVAIL`` half-way.
"""

from __future__ import annotations

import json
import math
import os
import resource
import selectors
import subprocess
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from realtime_lab.bench.loadgen import split
from realtime_lab.bench.native import source_env
from realtime_lab.errors import RealtimeLabError

#: Descriptors a process needs besides its connections (pipes, epoll, logs, imports).
FD_SPARE: Final = 256
#: Ports of the range left to everyone else on the machine, per source address.
PORT_MARGIN: Final = 0.9
OPEN_TIMEOUT: Final = 600.0  # the load client gives up on its own after 30 s without progress
REPLY_TIMEOUT: Final = 60.0
_COUNTS: Final = (
    "events",
    "bytes",
    "bytes_up",
    "lost",
    "dup",
    "reordered",
    "resets",
    "overflows",
    "disconnects",
    "failures",
    "requests",
)


class FleetError(RealtimeLabError):
    """A load client process exited, or answered something other than its protocol."""


def port_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The kernel's ephemeral port range (the Linux default when it cannot be read)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def ports_per_source() -> int:
    """Connections one source address can open to one server port, with a margin for others."""
    low, high = port_range()
    return int((high - low + 1) * PORT_MARGIN)


def source_addresses(count: int, wanted: int = 0) -> list[str]:
    """Loopback source addresses for ``count`` connections: ``wanted`` of them, or (0) enough.

    ``127.0.0.2`` upwards: ``127.0.0.1`` is the server's own, and leaving it out keeps the
    clients' ports out of its range.
    """
    n = wanted if wanted > 0 else max(1, math.ceil(count / ports_per_source()))
    if n > 250:
        raise FleetError(f"{n} source addresses asked for; 127.0.0.2-127.0.0.251 is the most")
    return [f"127.0.0.{2 + i}" for i in range(n)]


def nr_open() -> int:
    """The most descriptors a process may be allowed (``/proc/sys/fs/nr_open``)."""
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted``; return the soft limit now.

    The soft limit goes up to the hard one; when that is short of ``wanted`` and the process may
    raise it (root), both go to ``wanted`` (at most ``nr_open``). Processes started afterwards
    (the server, the load clients) inherit the result.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = hard == resource.RLIM_INFINITY
    if not infinite and hard < wanted:
        target = min(wanted, nr_open())
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            pass  # not root: the hard limit stands
    goal = max(soft, wanted) if infinite else hard
    if soft < goal:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (goal, hard))
            soft = goal
        except (ValueError, OSError):
            pass
    return int(soft)


@dataclass
class Capacity:
    """How many connections a run can open, and what cut it (``limits``; empty: nothing)."""

    requested: int
    allowed: int
    fd_limit: int
    sources: list[str]
    ports_per_source: int
    limits: list[str] = field(default_factory=list)
    #: Load client processes to spread the connections over (each within the limit).
    processes: int = 1


def plan(
    count: int, processes: int, server_conns: int = 0, sources: int = 0, servers: int = 1
) -> Capacity:
    """Raise the descriptor limit for ``count`` connections and check the port range.

    ``processes``: load client processes, at least (:attr:`Capacity.processes` adds more when
    one cannot hold its share under the descriptor limit). ``servers``: server processes, which
    share the connections too (one port each); ``server_conns``: connections each server holds
    besides these (its descriptors count too: it inherits this process's limit). ``sources``:
    source addresses (0: as many as needed).
    """
    servers = max(servers, 1)
    addresses = source_addresses(math.ceil(count / servers), sources)
    per_server = math.ceil(count / servers) + server_conns
    fd_limit = raise_nofile(max(math.ceil(count / max(processes, 1)), per_server) + FD_SPARE)
    room = max(fd_limit - FD_SPARE, 1)
    processes = max(processes, 1, math.ceil(count / room))
    allowed = count
    limits = []
    by_fds = max(room - server_conns, 0) * servers
    if by_fds < allowed:
        allowed = by_fds
        limits.append(
            f"RLIMIT_NOFILE is {fd_limit} and may not be raised here (the hard limit moves only "
            f"with CAP_SYS_RESOURCE): {servers} server process(es) can hold about {allowed} "
            "connections (more: --processes N on a shared bus, --bus redis)"
        )
    ports = ports_per_source()
    by_ports = ports * len(addresses) * servers
    if by_ports < allowed:
        allowed = by_ports
        low, high = port_range()
        limits.append(
            f"ip_local_port_range {low}-{high} gives {ports} connections per source address "
            f"to one server port; {len(addresses)} address(es) and {servers} port(s): {by_ports}"
        )
    return Capacity(count, allowed, fd_limit, addresses, ports, limits, processes)


class Fleet:
    """Native load client processes holding ``count`` connections of one transport.

    Use it as a context manager: :meth:`open`, then :meth:`start` and :meth:`stop` around each
    measurement window; leaving closes every connection and waits for the processes.
    """

    def __init__(
        self,
        binary: str,
        host: str,
        port: int,
        transport: str,
        path: str,
        host_header: str,
        count: int,
        processes: int,
        sources: list[str] | None = None,
        ports: list[int] | None = None,
    ) -> None:
        self.argv = [binary, host, str(port), transport]
        #: Several server processes on ``host`` (one bus): connection i reads from the i-th mod n.
        self.ports = list(ports or [])
        self.path = path
        self.host_header = host_header
        self.shares = [n for n in split(count, max(processes, 1)) if n]
        self.sources = list(sources or [])
        self.procs: list[subprocess.Popen[bytes]] = []

    def open(
        self, timeout: float = OPEN_TIMEOUT, tick: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Start the processes and wait until each has every connection open (or failed).

        ``tick`` is called about every 0.2 s while waiting (to sample the server). Returns
        ``clients`` (opened), ``failures``, ``errors`` and ``seconds`` (from the first start to
        the last connection's response head).

        Raises:
            FleetError: a process exited or did not answer within ``timeout``.
        """
        env = source_env(self.sources, ports=self.ports)
        started = time.monotonic()
        for share in self.shares:
            argv = [*self.argv, str(share), self.host_header, self.path]
            self.procs.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            )
        replies = self._replies("opened", timeout, tick)
        seconds = time.monotonic() - started
        return {
            "clients": sum(int(r["clients"]) for r in replies),
            "failures": sum(int(r["failures"]) for r in replies),
            "errors": [e for r in replies for e in r["errors"]][:10],
            "seconds": seconds,
        }

    def _out(self, proc: subprocess.Popen[bytes]) -> IO[bytes]:
        assert proc.stdout is not None
        return proc.stdout

    def _replies(
        self, op: str, timeout: float, tick: Callable[[], None] | None = None
    ) -> list[dict[str, Any]]:
        waiting = {self._out(p).fileno(): i for i, p in enumerate(self.procs)}
        replies: list[dict[str, Any]] = [{} for _ in self.procs]
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for fd in waiting:
                sel.register(fd, selectors.EVENT_READ)
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(f"load client did not answer {op!r} in {timeout:g} s")
                for key, _ in sel.select(min(left, 0.2)):
                    index = waiting.pop(int(key.fd))
                    sel.unregister(key.fd)
                    replies[index] = self._reply(self.procs[index], op)
                if tick is not None:
                    tick()
        return replies

    def _reply(self, proc: subprocess.Popen[bytes], op: str) -> dict[str, Any]:
        line = self._out(proc).readline()
        try:
            reply: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            code = proc.wait(5) if not line else None
            raise FleetError(
                f"load client: expected {op!r}, got {line[:200]!r} (exit {code})"
            ) from exc
        if reply.get("op") != op:
            raise FleetError(f"load client: expected {op!r}, got {reply}")
        return reply

    def _send(self, command: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            try:
                proc.stdin.write(command.encode() + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise FleetError(f"load client exited (code {proc.poll()})") from exc

    def start(self) -> None:
        """Begin a measurement window in every process (counts start once this returns)."""
        self._send("start")
        self._replies("started", REPLY_TIMEOUT)

    def stop(self) -> dict[str, Any]:
        """End the window; the processes' tallies added up (``latency``: an ``array('d')``)."""
        self._send("stop")
        total: dict[str, Any] = {k: 0 for k in _COUNTS}
        total.update(cpu=0.0, errors=[], latency=array("d"))
        for proc in self.procs:  # each answers in turn; the pipes hold what the others wrote
            reply = self._reply(proc, "window")
            out = self._out(proc)
            latency = out.read(8 * int(reply["latency_count"]))
            # The rest the protocol sends after the latencies (read, not used here).
            out.read(8 * int(reply.get("ttft_count", 0)))
            out.read(8 * int(reply.get("gap_count", 0)))
            total["latency"].frombytes(latency)
            for key in _COUNTS:
                total[key] += int(reply[key])
            total["cpu"] += float(reply["cpu"])
            total["errors"].extend(reply["errors"])
        return total

    def close(self) -> None:
        """Close every connection and wait for the processes (killed after 10 s)."""
        procs, self.procs = self.procs, []
        for proc in procs:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def env_cpus() -> int:
    """Load client processes to start: one per CPU."""
    return max(os.cpu_count() or 1, 1)


__all__ = [
    "Capacity",
    "Fleet",
    "FleetError",
    "plan",
    "port_range",
    "ports_per_source",
    "raise_nofile",
    "source_addresses",
]
