"""A tcpdump capture of one server port on loopback, read back per TCP connection.

:class:`Ports` is a socket factory for aiohttp that binds every client socket first, so the test
knows each connection's ephemeral port (and what it was for). :class:`Capture` starts tcpdump,
proves it records by finding a probe connection's SYN in its file, and after the traffic waits
until every connection the test opened has ended in the file before it stops tcpdump (SIGINT)
and checks that the kernel dropped nothing. :func:`connections` decodes the file into
per-connection records: the server's bytes, SYN to FIN, from TCP sequence numbers, with any gap
(a missing segment) reported rather than skipped.

tcpdump decodes its own file (``tcpdump -r``): no pcap parser is written here and no package is
added for one (dpkt or scapy would repeat what the tool the test needs anyway already does).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

WAIT: Final = 15.0  # seconds any wait on tcpdump may take before the test fails
SEQ_SPACE: Final = 1 << 32
# "IP 127.0.0.1.41234 > 127.0.0.1.40001: Flags [P.], seq 17:230, ack 1, win 512, ..., length 213"
# (-nn -S -t). The first ", length N" after the flags is the TCP payload; a payload decoder
# tcpdump picks by port may append ": ..." after it, which is ignored.
SEGMENT: Final = re.compile(
    r"IP (?P<src>[\d.]+)\.(?P<sport>\d+) > (?P<dst>[\d.]+)\.(?P<dport>\d+): "
    r"Flags \[(?P<flags>[^\]]+)\](?:, seq (?P<seq>\d+)(?::(?P<end>\d+))?)?.*?, length (?P<len>\d+)"
)
DROPPED: Final = re.compile(rb"(\d+) packets? dropped by kernel")


class Ports:
    """Binds each client socket before aiohttp connects it, and remembers its port and purpose.

    Pass ``ports.factory(label)`` as ``aiohttp.TCPConnector(socket_factory=...)``. No two
    connections of one test share a port, so the port names the connection in the capture.
    """

    def __init__(self) -> None:
        self.labels: dict[int, str] = {}
        self.ignored: set[int] = set()  # probes sent before the capture was proved live

    def bind(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket bound to an ephemeral port no connection of this test has had yet.

        Record it (:meth:`add`, or ``ignored``) before binding the next one.
        """
        # The kernel may hand out a port again once its connection is closed (the server's
        # TIME_WAIT does not hold the client's port); the ones it offers twice are kept bound
        # until it offers a fresh one.
        refused: list[socket.socket] = []
        try:
            while True:
                sock = socket.socket(family, kind, proto)
                try:
                    sock.bind(("", 0))
                except OSError:
                    sock.close()
                    raise
                port = sock.getsockname()[1]
                if port not in self.labels and port not in self.ignored:
                    return sock
                refused.append(sock)
        finally:
            for sock in refused:
                sock.close()

    def factory(self, label: str) -> Callable[[tuple[Any, ...]], socket.socket]:
        """A socket factory whose sockets are all recorded under ``label``."""

        def make(addr_info: tuple[Any, ...]) -> socket.socket:
            sock = self.bind(addr_info[0], addr_info[1], addr_info[2])
            self.add(sock.getsockname()[1], label)
            return sock

        return make

    def add(self, port: int, label: str) -> None:
        """Record a connection the test opens from ``port``; fails if the port had one."""
        if port in self.labels or port in self.ignored:
            # Two connections on one port would be summed as one: refuse rather than guess.
            first = self.labels.get(port, "a probe")
            pytest.fail(f"port {port} used twice ({first}, then {label})")
        self.labels[port] = label

    def with_label(self, label: str) -> list[int]:
        """The ports of the connections recorded under ``label``, in the order opened."""
        return [port for port, name in self.labels.items() if name == label]

    def missing(self, seen: dict[int, list[Connection]]) -> list[str]:
        """What keeps the capture from accounting exactly for every connection recorded here.

        Each must be in ``seen`` once, SYN to FIN without a gap, and ``seen`` must hold no
        connection the test did not open. Empty: the capture is complete.
        """
        out = []
        for port, label in self.labels.items():
            history = seen.get(port, [])
            if len(history) != 1:
                out.append(f"{label} (port {port}): {len(history)} connections in the capture")
                continue
            out.extend(f"{label} (port {port}): {why}" for why in history[0].problems())
        strangers = set(seen) - set(self.labels) - self.ignored
        out.extend(f"port {port}: a connection the test did not open" for port in strangers)
        return out


@dataclass
class Connection:
    """One TCP connection to the server, as the capture saw it."""

    client_port: int
    syn: int | None = None  # the client's initial sequence number (its SYN)
    isn: int | None = None  # the server's initial sequence number (its SYN-ACK)
    fin: int | None = None  # sequence number the server's FIN takes
    reset: bool = False  # an RST, either way
    data: list[tuple[int, int]] = field(default_factory=list)  # server payload: (start, end)

    @property
    def ended(self) -> bool:
        """Whatever the server will send on it has been captured (FIN), or it was cut (RST)."""
        return self.fin is not None or self.reset

    def problems(self) -> list[str]:
        """Why the server's bytes on this connection cannot be counted exactly (empty: they can)."""
        out = []
        if self.syn is None:
            out.append("no SYN from the client")
        if self.isn is None:
            out.append("no SYN-ACK from the server")
        if self.fin is None:
            out.append("no FIN from the server")
        if self.reset:
            out.append("reset (RST)")
        if self.isn is not None and self.fin is not None:
            covered = 0  # offsets 0..covered are in the capture, contiguously
            fin = self._offset(self.fin)
            for start, end in sorted(self._offsets()):
                if start > covered:
                    out.append(f"server bytes {covered}..{start} not in the capture")
                covered = max(covered, end)
            if covered < fin:
                out.append(f"server bytes {covered}..{fin} not in the capture")
            elif covered > fin:
                out.append(f"server bytes {fin}..{covered} after its FIN")
        return out

    def sent(self) -> int:
        """The bytes the server sent, SYN to FIN (call only when :meth:`problems` is empty)."""
        assert self.fin is not None
        return self._offset(self.fin)

    def _offset(self, seq: int) -> int:
        assert self.isn is not None
        return (seq - self.isn - 1) % SEQ_SPACE  # the SYN takes the ISN itself

    def _offsets(self) -> list[tuple[int, int]]:
        return [(self._offset(a), self._offset(a) + (b - a) % SEQ_SPACE) for a, b in self.data]


def connections(text: str, server_port: int) -> dict[int, list[Connection]]:
    """Per client port, the connections in ``tcpdump -r -nn -S -t`` output, in order.

    A second client SYN on a port starts a new connection, so a reused port shows as two.
    """
    found: dict[int, list[Connection]] = {}
    for line in text.splitlines():
        match = SEGMENT.match(line)
        if match is None:
            pytest.fail(f"tcpdump printed a line this parser does not know: {line!r}")
        sport, dport = int(match["sport"]), int(match["dport"])
        from_server = sport == server_port
        if not from_server and dport != server_port:
            pytest.fail(f"a segment of another port in the capture: {line!r}")
        client = dport if from_server else sport
        flags = match["flags"]
        history = found.setdefault(client, [])
        seq = None if match["seq"] is None else int(match["seq"])
        if not from_server and "S" in flags:
            if not history or history[-1].syn != seq:  # else a retransmitted SYN
                history.append(Connection(client, syn=seq))
        elif not history:
            history.append(Connection(client))  # its SYN is not in the capture
        conn = history[-1]
        if "R" in flags:
            conn.reset = True
        if not from_server or seq is None:
            continue
        if "S" in flags:
            conn.isn = seq
        length = int(match["len"])
        if length:
            end = int(match["end"])
            assert (end - seq) % SEQ_SPACE == length, line
            conn.data.append((seq, end))
        if "F" in flags:
            conn.fin = (seq + length) % SEQ_SPACE
    return found


class Capture:
    """tcpdump writing every packet to or from ``port`` on ``lo`` into ``path`` (a pcap file)."""

    def __init__(self, binary: str, port: int, path: Path) -> None:
        self.binary = binary
        self.port = port
        self.path = path
        self.log = path.with_suffix(".stderr")
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = b""

    async def start(self, ports: Ports) -> None:
        """Run tcpdump and return once a probe connection's SYN is in its file.

        Skips the test when tcpdump exits before it listens (no right to capture here).
        """
        # -U: each packet is written to the file as it is captured, so what is read while it
        # runs is what it has; --immediate-mode: the kernel hands over each packet at once
        # instead of holding a ring block; -s 128: headers only (they carry all we count), so
        # the buffer (-B, KiB) holds far more packets than the test sends.
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    *(self.binary, "-i", "lo", "-nn", "-U", "--immediate-mode"),
                    *("-s", "128", "-B", "16384", "-w", str(self.path), f"tcp port {self.port}"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        async with asyncio.timeout(WAIT):
            while b"listening on" not in self.log.read_bytes():
                if self.proc.poll() is not None:
                    self.proc = None
                    why = self.log.read_bytes().decode(errors="replace").strip()
                    pytest.skip(f"tcpdump cannot capture here: {why}")
                await asyncio.sleep(0.02)  # polling the condition, deadline above
        # "listening on" says the socket is open, not that packets reach the file yet: they do
        # once a probe's SYN is there. A probe missed meanwhile is ignored (its port is not
        # given to another connection of the test, so nothing counted can be mistaken for it).
        async with asyncio.timeout(WAIT):
            while True:
                probe = ports.bind()
                try:
                    port = probe.getsockname()[1]
                    probe.connect(("127.0.0.1", self.port))
                    for _ in range(10):
                        history = (await self.read(partial=True)).get(port, [])
                        if any(conn.syn is not None for conn in history):
                            ports.add(port, "probe")
                            return
                        await asyncio.sleep(0.05)  # polling the condition, deadline above
                    ports.ignored.add(port)
                finally:
                    probe.close()

    async def wait_ended(self, ports: Ports) -> None:
        """Wait until the file shows every connection of ``ports`` ended, then stop tcpdump.

        Stopping it any earlier could lose packets it has not taken from the kernel yet: SIGINT
        ends its loop, not the kernel's delivery. Fails naming the connections still open in
        the capture after :data:`WAIT` seconds, and when tcpdump reports dropped packets.
        """
        open_ = list(ports.labels)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT):
                while open_:
                    seen = await self.read(partial=True)
                    open_ = [p for p in ports.labels if not any(c.ended for c in seen.get(p, []))]
                    if open_:
                        await asyncio.sleep(0.05)  # polling the condition, deadline above
        code = self.kill()
        self.stderr = self.log.read_bytes()
        problems = []
        if open_:
            names = ", ".join(f"{ports.labels[p]} (port {p})" for p in open_)
            problems.append(f"no FIN or RST in the capture after {WAIT:g} s for: {names}")
        if code != 0:
            problems.append(f"tcpdump did not exit cleanly on SIGINT (exit code {code})")
        dropped = DROPPED.search(self.stderr)
        if dropped is None:
            problems.append("tcpdump did not report how many packets the kernel dropped")
        elif (count := int(dropped[1])) != 0:
            problems.append(f"the kernel dropped {count} packets: the capture is incomplete")
        if problems:
            tcpdump_said = self.stderr.decode(errors="replace").strip()
            pytest.fail("\n".join([*problems, f"tcpdump said: {tcpdump_said}"]))

    def kill(self) -> int | None:
        """Stop tcpdump if it runs (SIGINT, then SIGKILL after :data:`WAIT` s); its exit code.

        Idempotent, checks nothing: for cleanup when the test failed already.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
            return None

    async def read(self, *, partial: bool = False) -> dict[int, list[Connection]]:
        """The connections in the file so far (``partial``: tcpdump may still be writing)."""
        argv = [self.binary, "-r", str(self.path), "-nn", "-S", "-t"]
        done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=WAIT)
        text = done.stdout.decode()
        if partial:
            # The last record may be half written (tcpdump then says "truncated dump file");
            # and a line cut off with it must not be taken for a whole one.
            text = text[: text.rfind("\n") + 1]
        elif done.returncode != 0 or b"truncated" in done.stderr:
            pytest.fail(f"tcpdump cannot read back its capture: {done.stderr!r}")
        return connections(text, self.port)
