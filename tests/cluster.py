"""A real Redis Cluster on loopback ports: three masters, no replicas.

Three ``redis-server --cluster-enabled yes`` processes joined by
``redis-cli --cluster create``; ``start()`` returns once every node reports
``cluster_state:ok``.
"""

from __future__ import annotations

import shutil
import subprocess

import redis

from exq_fast.embedded import RedisServer, free_port, port_is_free
from tests.conftest import wait_for

MASTERS = 3


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536 and port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterSetup:
    """Start with ``start()``, stop everything with ``stop()``."""

    def __init__(self) -> None:
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> ClusterSetup:
        """Start the nodes and join them; on any failure, stop what was started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> ClusterSetup:
        for _ in range(MASTERS):
            node = RedisServer(port=_cluster_port(), extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000"))
            self.nodes.append(node.start())
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is needed to create a cluster")
        subprocess.run([cli, "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        wait_for(lambda: all(self._ok(node.port) for node in self.nodes), 30,
                 "the cluster to reach cluster_state:ok", 0.1)
        return self

    @staticmethod
    def _ok(port: int) -> bool:
        client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
        try:
            return "cluster_state:ok" in str(client.execute_command("CLUSTER", "INFO"))
        except (redis.exceptions.RedisError, OSError):
            return False
        finally:
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
