"""Build the native load client (``loadclient.c``) with the machine's C compiler, once.

The benchmark reads SSE and WebSocket streams with it when it can (see the reasons at the top
of ``loadclient.c``) and falls back to the asyncio clients of :mod:`.loadgen` when there is no
compiler. The binary is cached under ``$XDG_CACHE_HOME/realtime-lab`` (``~/.cache`` by default),
named after a hash of the source and the compiler, so an edited source is rebuilt and an
unchanged one is not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from realtime_lab.errors import RealtimeLabError

SOURCE: Final = Path(__file__).with_name("loadclient.c")
#: The bare C broadcaster of ``--baseline floor`` (see the top of ``floor.c``), built the same way.
FLOOR_SOURCE: Final = Path(__file__).with_name("floor.c")
CFLAGS: Final = ("-O2", "-std=gnu11", "-Wall", "-Wextra")
#: What the native client reads in the ticker workload: the streaming transports. Polls keep
#: the asyncio clients (their cost is requests, not reads, and they are nowhere near a core at
#: these loads).
NATIVE_TRANSPORTS: Final = frozenset({"sse", "ws", "fetch"})
#: The chats workload's rounds it runs (one reader per chat): each user POSTs /api/chats and
#: reads the channel (sse, ws), or sends the one request that starts and streams its chat
#: (fetch, openai, and the naive baseline's GET). Only it runs openai and naive.
NATIVE_CHATS: Final = frozenset({"sse", "ws", "fetch", "openai", "naive"})
#: The binary's name for each chats-workload transport (see the top of loadclient.c).
NATIVE_CHAT_MODES: Final = {
    "sse": "sse-chat",
    "ws": "ws-chat",
    "fetch": "fetch",
    "openai": "openai",
    "naive": "naive",
}
#: The environment variable that gives the binary its source addresses (comma-separated IPv4):
#: connection i binds to the (i mod n)-th before connecting, so that more connections than one
#: address has ephemeral ports reach one server port (see :func:`source_env`).
SOURCES_ENV: Final = "RTL_LOADCLIENT_SOURCES"
#: The server processes' ports (comma-separated) when several share one bus: connection i reads
#: from the (i mod n)-th and POSTs its chats to the next one (see :func:`source_env`).
PORTS_ENV: Final = "RTL_LOADCLIENT_PORTS"


class NativeBuildError(RealtimeLabError):
    """The native load client could not be built (no compiler, or it refused the source)."""


@dataclass(frozen=True)
class NativeClient:
    """A built load client: its path, and the compiler that built it (for the report)."""

    path: Path
    compiler: str


def cache_dir() -> Path:
    """Where built binaries are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "realtime-lab"


def build(
    cc: str | None = None, directory: Path | None = None, source: Path = SOURCE
) -> NativeClient:
    """Build (or reuse) the native load client, or another of the bench's C programs.

    Args:
        cc: the compiler; default ``$CC``, else ``cc``, else ``gcc``.
        directory: where to keep the binary; default :func:`cache_dir`.
        source: what to build: the load client, or :data:`FLOOR_SOURCE`.

    Returns:
        The binary. Hand the load client's ``path`` to the load workers (the ``native`` key of
        ``open``); run the floor's with :class:`realtime_lab.bench.floor.Floor`.

    Raises:
        NativeBuildError: no compiler on ``PATH``, or it failed (its output is in the message);
            run the asyncio load clients instead.
    """
    compiler = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    found = shutil.which(compiler) if compiler else None
    if found is None:
        raise NativeBuildError("no C compiler found (set CC, or install gcc)")
    code = source.read_bytes()
    digest = hashlib.sha256(code + found.encode() + " ".join(CFLAGS).encode()).hexdigest()
    directory = directory or cache_dir()
    target = directory / f"{source.stem}-{digest[:16]}"
    if target.is_file() and os.access(target, os.X_OK):
        return NativeClient(target, found)
    directory.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: two benchmarks starting at once never run half a file.
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run(
            [found, *CFLAGS, "-o", tmp, str(source)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise NativeBuildError(f"{found} failed: {done.stderr.strip()[:2000]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"{found} could not run: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return NativeClient(target, found)


def source_env(
    sources: list[str], base: dict[str, str] | None = None, ports: list[int] | None = None
) -> dict[str, str]:
    """The environment to start the binary with so its connections spread over ``sources``.

    ``base``: the environment to extend (default: this process's). An empty ``sources`` leaves
    the choice of source address to the kernel (one address: about 28k connections per server
    port, the size of ``/proc/sys/net/ipv4/ip_local_port_range``). ``ports``: several server
    processes on the binary's HOST (connection i streams from ``ports[i % n]`` and POSTs its
    chats to ``ports[(i + 1) % n]``); ``None`` or one port: its PORT argument for everything.
    """
    env = dict(os.environ if base is None else base)
    env.pop(SOURCES_ENV, None)
    env.pop(PORTS_ENV, None)
    if sources:
        env[SOURCES_ENV] = ",".join(sources)
    if ports and len(ports) > 1:
        env[PORTS_ENV] = ",".join(str(port) for port in ports)
    return env


__all__ = [
    "FLOOR_SOURCE",
    "NATIVE_CHATS",
    "NATIVE_CHAT_MODES",
    "NATIVE_TRANSPORTS",
    "PORTS_ENV",
    "SOURCES_ENV",
    "NativeBuildError",
    "NativeClient",
    "build",
    "cache_dir",
    "source_env",
]
