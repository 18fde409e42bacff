"""The bare C broadcaster of ``--scenario scale --baseline floor`` (``floor.c``), as a process.

The scale scenario's subscribers run against it after the lab's server, with the same load
client, counts and windows (:func:`realtime_lab.bench.scale.run_subscribers`), so that the
report puts what this machine gives a fan-out at all (one thread, one ``send()`` per subscriber,
nothing else) beside what the lab gives.
"""

from __future__ import annotations

import select
import subprocess
from pathlib import Path
from typing import Final

from realtime_lab.bench.server import (
    _die_with_parent,
    cpu_seconds,
    http_json,
    last_seq_at,
    rss_kb,
    stop_process,
)
from realtime_lab.bench.target import BenchError

START_TIMEOUT_S: Final = 10.0
HOST: Final = "127.0.0.1"  # floor.c listens there only


class Floor:
    """``floor.c``'s binary running at ``rate`` events/s; use it as a context manager.

    Entering starts it and waits until it answers ``/api/health``; leaving stops it. Read
    :attr:`port`, :meth:`cpu`, :meth:`rss` and :meth:`last_seq` in between.
    """

    def __init__(self, binary: Path | str, rate: float) -> None:
        self.argv = [str(binary), f"{rate:g}"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def host_header(self) -> str:
        return f"{HOST}:{self.port}"

    def __enter__(self) -> Floor:
        """Start it; raises :class:`BenchError` when it does not listen within 10 s."""
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # the coordinator runs no threads (see runner)
        )
        try:
            self.port = self._read_port()
            # It prints its port once listening, so one request is the check, not a poll.
            try:
                http_json(self.url + "/api/health")
            except OSError as exc:  # urllib's URLError is one
                raise BenchError(f"floor: no answer on {self.url}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        return self

    def _read_port(self) -> int:
        assert self.proc is not None
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], START_TIMEOUT_S)
        line = out.readline() if ready else b""
        if not line.strip().isdigit():
            raise BenchError(f"floor: {self.argv[0]} did not start (said {line[:200]!r})")
        return int(line)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the process (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc, 5.0)
        if proc.stdout is not None:
            proc.stdout.close()

    def _pid(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError("floor: the broadcaster is not running")
        return self.proc.pid

    def cpu(self) -> float:
        """CPU seconds it has used so far."""
        return cpu_seconds(self._pid())

    def rss(self) -> int:
        """Its resident memory now, in KiB."""
        return rss_kb(self._pid())

    def last_seq(self) -> int | None:
        """The sequence number of the last event it sent (``None``: none yet)."""
        return last_seq_at(self.url + "/api/channels/floor") or None  # it counts from 1


__all__ = ["Floor"]
