"""The test suite's private Redis servers (never the shared one on 6379).

The servers themselves are :mod:`realtime_lab.bench.redisproc`'s (the benchmark starts the same
ones), re-exported here so that tests keep one import::

    from tests.redis_server import RedisServer, redis_server_binary

    with RedisServer() as server:          # free port, no persistence, temp dir
        url = server.url(prefix="t1")      # redis://127.0.0.1:<port>/0?prefix=t1

Call :func:`redis_server_binary` first and ``pytest.skip`` when it returns ``None``. What only
tests do, slot moves and failovers, is :class:`ClusterControl`, here.
"""

from __future__ import annotations

from realtime_lab.bench.redisproc import (
    RedisClusterServers,
    RedisServer,
    cluster_info,
    cluster_slots,
    free_port,
    ping,
    redis_cli_binary,
    redis_client,
    redis_server_binary,
)


class ClusterControl:
    """Slot moves and failovers on a :class:`RedisClusterServers` (blocking: run in a thread)."""

    def __init__(self, cluster: RedisClusterServers) -> None:
        self.cluster = cluster

    def alive_ports(self) -> list[int]:
        return [n.port for n in self.cluster.nodes if n.process is not None and ping(n.port)]

    def owner(self, slot: int) -> int:
        """The port of the primary serving ``slot`` (as the first live node says)."""
        for first, last, primary, _replicas in cluster_slots(self.alive_ports()[0]):
            if first <= slot <= last:
                return primary
        raise LookupError(f"slot {slot} is not served")

    def replicas_of(self, port: int) -> list[int]:
        """The ports of the replicas streaming from the primary on ``port`` (its own word)."""
        with redis_client(port) as client:
            info = client.info("replication")
        return [
            int(v["port"])
            for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        ]

    def primaries(self) -> list[int]:
        return sorted({primary for _f, _l, primary, _r in cluster_slots(self.alive_ports()[0])})

    def node_id(self, port: int) -> str:
        with redis_client(port) as client:
            return str(client.execute_command("CLUSTER MYID").decode())

    def migrate_slot(self, slot: int, target: int, batch: int = 10) -> None:
        """Move ``slot`` and its keys to the primary on ``target`` (``redis-cli --cluster
        reshard``'s steps: IMPORTING, MIGRATING, MIGRATE in batches, SETSLOT NODE)."""
        source = self.owner(slot)
        if source == target:
            return
        source_id, target_id = self.node_id(source), self.node_id(target)
        with redis_client(source) as src, redis_client(target) as dst:
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
                with redis_client(port) as other:
                    other.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.cluster.nodes if n.port == port)


__all__ = [
    "ClusterControl",
    "RedisClusterServers",
    "RedisServer",
    "cluster_info",
    "free_port",
    "ping",
    "redis_cli_binary",
    "redis_server_binary",
]
