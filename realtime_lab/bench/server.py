"""The server under test, as a separate process, and what ``/proc`` says it costs.

The server runs as ``python -m realtime_lab serve`` in its own process so that its CPU time and
resident memory are its own, not the load clients'. psutil would read the same two files; the
benchmark is Linux-only and needs two numbers, so it reads them directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from realtime_lab.errors import RealtimeLabError

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServerStartError(RealtimeLabError):
    """The server process exited or did not answer ``/api/health`` in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the server process cannot be given port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new soft limit.

    Thousands of client sockets need thousands of descriptors; processes started afterwards
    (the server, the load workers) inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` (``/proc/<pid>/stat`` utime + stime)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces; count from after it.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ServerStartError(f"process {pid} has no VmRSS (a zombie?)")


def machine_cpu() -> tuple[float, float, float]:
    """``(busy, softirq, total)`` jiffies of all CPUs so far (``/proc/stat``).

    Loopback TCP work done in softirq context is charged to no process, so a server's own CPU
    time misses part of what its writes cost; the machine-wide split shows it.
    """
    with open("/proc/stat") as stat:
        fields = [float(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user.
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return total - idle, fields[6], total


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if the bench dies without stopping the server, the kernel sends it
    # SIGTERM, so no orphan keeps a port and a core busy.
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM ``proc`` if it still runs and wait ``timeout`` s for it; SIGKILL it if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# The target is a local server: never route it through an HTTP(S)_PROXY from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_json(url: str, method: str = "GET", body: Any = None, timeout: float = 10.0) -> Any:
    """A small blocking JSON request for the control plane (health, stats, config).

    Raises:
        urllib.error.URLError: the server did not answer.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with _DIRECT.open(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def last_seq_at(url: str) -> int | None:
    """The sequence number of the last event ``GET url`` (``/api/channels/{name}``) reports.

    ``None``: no event yet (a 404, or no ``last_id`` of the form ``<epoch>-<seq>``).
    """
    try:
        info = http_json(url)
    except OSError:  # 404 before the first event (urllib's HTTPError is an OSError)
        return None
    last = info.get("last_id") if isinstance(info, dict) else None
    if not isinstance(last, str) or "-" not in last:
        return None
    return int(last.rsplit("-", 1)[1])


class ServerProcess:
    """``realtime-lab serve`` on a free port of 127.0.0.1, started and stopped by the bench.

    Use it as a context manager; read :meth:`cpu` and :meth:`rss` while it runs.
    """

    def __init__(self, options: dict[str, Any], log: Path | None = None) -> None:
        self.options = options
        self.log_path = log
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerStartError("the server is not running")
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until ``/api/health`` answers.

        Raises:
            ServerStartError: it exited (its log is in :attr:`log_path`) or never answered.
        """
        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            args = self.command()
            if self.log_path is not None:
                self._log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._log or subprocess.DEVNULL,
                stderr=self._log or subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # the coordinator runs no threads (see runner)
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    http_json(self.url + "/api/health", timeout=2.0)
                    return
                except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                    time.sleep(0.05)
            self.stop()
        raise ServerStartError(f"the server did not start; see {self.log_path}")

    def command(self) -> list[str]:
        """The server's command line for :attr:`port` (a subclass may run another server)."""
        args = [sys.executable, "-m", "realtime_lab", "serve", "--host", "127.0.0.1"]
        args += ["--port", str(self.port)]
        for name, value in self.options.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            else:
                args += [flag, str(value)]
        return args

    def cpu(self) -> float:
        """CPU seconds the server has used so far."""
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        """The server's resident memory now, in KiB."""
        return rss_kb(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful: streams are ended), then wait; SIGKILL if it hangs. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
