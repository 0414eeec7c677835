"""A real three-node NATS cluster (MQTT on every node, JetStream replicated) as child
processes, for integration tests and the node-kill benchmark.

Each node gets its own free loopback ports (client, cluster route, MQTT), its own
JetStream directory under one temporary directory, and a config file written there from
:func:`node_config` (the same settings, commented, are in ``docs/nats-cluster.conf``).
Nodes are stopped by their PID; :meth:`NatsCluster.kill` is a ``kill -9`` of one node.
Never the system ``nats-server`` on 4222: every port here is picked free.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.testing.managed import StartStop
from bridge.testing.ports import free_port, port_accepts

logger = logging.getLogger(__name__)

#: How long a fresh cluster may take to elect its JetStream meta leader and create the
#: MQTT streams (the first MQTT client waits for them).
READY_TIMEOUT_S = 60.0


class NatsNotFound(FileNotFoundError):
    """No ``nats-server`` binary (``$NATS_SERVER_BIN`` or ``PATH``)."""


class NatsStartError(RuntimeError):
    """A node exited or the cluster was not ready in time; the message has the log tail."""


def find_nats_server() -> Path:
    explicit = os.environ.get("NATS_SERVER_BIN")
    found = explicit or shutil.which("nats-server")
    if not found or not Path(found).is_file():
        raise NatsNotFound(
            f"nats-server not found (tried {explicit or 'PATH'}); install nats-server 2.9+ "
            "or set NATS_SERVER_BIN"
        )
    return Path(found)


@dataclass(frozen=True, slots=True)
class NatsNode:
    name: str
    client_port: int
    route_port: int
    mqtt_port: int
    store_dir: Path

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


def node_config(node: NatsNode, peers: list[NatsNode], *, cluster: str = "kb") -> str:
    """One node's configuration (see docs/nats-cluster.conf for what each line is for)."""
    routes = ", ".join(f"nats-route://127.0.0.1:{peer.route_port}" for peer in peers)
    return f"""\
server_name: {node.name}
listen: 127.0.0.1:{node.client_port}
jetstream {{
  store_dir: "{node.store_dir}"
  max_memory_store: 256MB
  max_file_store: 2GB
}}
cluster {{
  name: {cluster}
  listen: 127.0.0.1:{node.route_port}
  routes: [{routes}]
}}
mqtt {{
  listen: 127.0.0.1:{node.mqtt_port}
  stream_replicas: 3
  consumer_replicas: 3
  ack_wait: "10s"
  max_ack_pending: 1024
}}
"""


class NatsCluster(StartStop):
    """Three (or ``size``) NATS nodes forming one JetStream cluster."""

    def __init__(self, size: int = 3, *, root: Path | None = None) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self._binary = find_nats_server()
        self._owned_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="kb-nats-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            NatsNode(
                name=f"n{i + 1}",
                client_port=free_port(),
                route_port=free_port(),
                mqtt_port=free_port(),
                store_dir=self.root / f"n{i + 1}" / "jetstream",
            )
            for i in range(size)
        ]
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- addresses ------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [node.mqtt_url for node in self.nodes]

    @property
    def broker_list(self) -> str:
        """``mqtt://127.0.0.1:p1,mqtt://127.0.0.1:p2,...``: what ``--broker`` takes."""
        return ",".join(self.urls)

    def url_of(self, index: int) -> str:
        return self.nodes[index].mqtt_url

    def log_path(self, index: int) -> Path:
        return self.root / f"{self.nodes[index].name}.log"

    def pid(self, index: int) -> int | None:
        proc = self._procs.get(self.nodes[index].name)
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        for index in range(len(self.nodes)):
            self.start_node(index)
        self.wait_ready(timeout)

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        node.store_dir.mkdir(parents=True, exist_ok=True)
        peers = [peer for peer in self.nodes if peer is not node]
        config = self.root / f"{node.name}.conf"
        config.write_text(node_config(node, peers))
        log = self.log_path(index).open("ab")
        try:
            self._procs[node.name] = subprocess.Popen(
                [str(self._binary), "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every running node answers an MQTT retained round trip (JetStream's meta
        leader elected, the MQTT streams created and replicated)."""
        deadline = time.monotonic() + timeout
        for index, node in enumerate(self.nodes):
            if self.pid(index) is None and node.name in self._procs:
                continue
            while not _retained_round_trip(node.mqtt_port, timeout=2.0):
                proc = self._procs.get(node.name)
                if proc is not None and proc.poll() is not None:
                    raise NatsStartError(f"{node.name} exited:\n{self._tail(index)}")
                if time.monotonic() > deadline:
                    raise NatsStartError(
                        f"{node.name} not ready within {timeout:.0f}s:\n{self._tail(index)}"
                    )
                time.sleep(0.2)

    def kill(self, index: int) -> None:
        """``kill -9`` one node: its clients' connections die, and their Wills with it."""
        proc = self._procs.get(self.nodes[index].name)
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._procs.clear()
        if self._owned_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _tail(self, index: int, lines: int = 30) -> str:
        try:
            text = self.log_path(index).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _retained_round_trip(port: int, *, timeout: float) -> bool:
    """Publish a retained message and read it back through a wildcard: True when the
    node's MQTT (and the JetStream behind it) answers."""
    if not port_accepts("127.0.0.1", port):
        return False
    topic = f"kb-ready/{uuid.uuid4().hex}"
    got: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"kb-ready-{uuid.uuid4().hex[:8]}")
    client.on_message = lambda _c, _u, msg: got.append(bytes(msg.payload))
    try:
        client.connect("127.0.0.1", port, keepalive=10)
        client.loop_start()
        info = client.publish(topic, b"1", qos=1, retain=True)
        info.wait_for_publish(timeout)
        client.subscribe("kb-ready/#", qos=1)
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout)
        return bool(got)
    except (OSError, RuntimeError, ValueError):
        return False
    finally:
        client.loop_stop()
        client.disconnect()


__all__ = ["NatsCluster", "NatsNode", "NatsNotFound", "NatsStartError", "node_config"]
