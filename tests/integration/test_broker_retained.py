"""What a plain MQTT client (mosquitto_sub, Home Assistant) gets from the embedded broker: only
the retained messages of the topics it subscribed to, as from Mosquitto."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest

from nsync_lab.testing import BrokerProcess, RawClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto_sub missing"),
]


def mosquitto_sub(port: int, topic: str, count: int = 1) -> list[str]:
    """The first ``count`` messages (``topic payload`` lines) mosquitto_sub prints for
    ``topic``; it gives up after 5 s."""
    command = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-v"]
    out = subprocess.run(
        [*command, "-C", str(count), "-W", "5", "-t", topic],
        capture_output=True,
        text=True,
        timeout=15,
    )
    return out.stdout.splitlines()


def test_a_new_client_gets_only_the_retained_messages_it_subscribed_to(
    broker_kind: str, broker_factory: Callable[[str], BrokerProcess], unique_topic: str
) -> None:
    broker = broker_factory(broker_kind)
    base = unique_topic
    # another client subscribes to a wider filter, as every node does
    with RawClient(broker.url, "home", [f"{base}/node/+/state"]) as other:
        other.publish(f"{base}/node/n1/state", '{"role": "master"}', retain=True)
        other.publish(f"{base}/state/master", "n1", retain=True)
        other.wait(lambda m: m.topic == f"{base}/node/n1/state", "the node state back")
        assert mosquitto_sub(broker.port, f"{base}/state/master") == [f"{base}/state/master n1"]
        # and a client that asks for both gets both
        both = mosquitto_sub(broker.port, f"{base}/#", count=2)
        assert sorted(both) == [
            f'{base}/node/n1/state {{"role": "master"}}',
            f"{base}/state/master n1",
        ]
