"""The Prometheus endpoint of a real bridge, scraped over HTTP after real traffic."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from bridge.ops.metrics_server import serve_metrics
from bridge.testing.mosquitto import MosquittoProcess
from schemas import TopicKind, device_topic
from tests.support.bridge_harness import Db, eventually, running_bridge
from tests.support.devices import FakeKiosk, publish_raw

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_endpoint_reflects_real_traffic(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    db = Db(sqlite_url)
    kiosks = [FakeKiosk(mosquitto.url, f"m-{n}", 10 + n) for n in range(3)]
    try:
        async with (
            running_bridge(mosquitto.url, sqlite_url) as bridge,
            serve_metrics(bridge.metrics.registry, "127.0.0.1", 0) as server,
        ):
            assert server.port > 0 and server.url.endswith("/metrics")
            for kiosk in kiosks:
                await kiosk.come_online()
                await kiosk.send_status(battery_level=60)
            await kiosks[0].crash()
            await publish_raw(
                mosquitto.url, device_topic("m-9", TopicKind.PRESENCE), b'{"state":"gone"}'
            )
            samples = await eventually(
                lambda: asyncio.to_thread(scrape, server.url),
                lambda s: (
                    value(s, "kb_presence_events_total", verdict="applied") >= 4
                    and value(s, "kb_status_written_total") >= 3
                ),
                what="4 presence events and 3 status rows in the scrape",
            )
            await eventually(lambda: db.status_of("m-0"), lambda s: s == "Disconnected")
    finally:
        for kiosk in kiosks:
            kiosk.close()
        db.close()
    assert value(samples, "kb_presence_events_total", verdict="applied") == 4
    assert value(samples, "kb_messages_received_total", kind="presence") == 5
    assert value(samples, "kb_messages_received_total", kind="status") == 3
    assert value(samples, "kb_messages_rejected_total", reason="bad_payload") == 1
    assert value(samples, "kb_status_written_total") == 3
    assert value(samples, "kb_broker_connected") == 1
    assert value(samples, "kb_presence_commit_lag_seconds_count") == 4
    assert value(samples, "kb_db_batch_size_count", op="presence") >= 1
    # Closed with the block: nothing listens on the port any more.
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(scrape, server.url)


async def test_serve_metrics_serves_a_registry_and_refuses_a_taken_port() -> None:
    registry = CollectorRegistry()
    hits = Counter("kb_test_hits", "test counter", registry=registry)
    hits.inc(3)
    async with serve_metrics(registry, "127.0.0.1", 0) as first:
        assert value(await asyncio.to_thread(scrape, first.url), "kb_test_hits_total") == 3
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            taken = probe.getsockname()[1]
            probe.listen()
            with pytest.raises(OSError):
                async with serve_metrics(registry, "127.0.0.1", taken):
                    pass
