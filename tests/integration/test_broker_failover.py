"""Broker failover: nodes given the same ordered broker list move to the next broker when the
current one dies, the master republishes the retained state there, and all of them move back
to the first broker once it is reachable again."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nsync_lab.testing import (
    BrokerProcess,
    NodeCluster,
    NodeSpec,
    Watcher,
    ok,
    tone_file,
    unique_cluster_name,
    wait_for,
)
from nsync_mqtt import sinklog
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.replication import sha224_file

pytestmark = pytest.mark.integration


def serving(url: str, cluster: str) -> dict[str, object] | None:
    """The status reply of a master reachable through `url`, or None."""
    try:
        with contextlib.closing(NSyncClient(url, cluster, timeout=1.0).connect()) as c:
            reply = c.status()
    except Exception:
        return None
    return reply if reply["success"] else None


def test_nodes_fail_over_and_come_back(
    broker_factory: Callable[[str], BrokerProcess], tmp_path: Path
) -> None:
    first = broker_factory("amqtt")  # the embedded broker of one box, say
    second = broker_factory("mosquitto")  # the household's Mosquitto
    name = unique_cluster_name()
    specs = [NodeSpec(f"n{i}", extra=["--broker", second.url]) for i in (1, 2, 3)]
    cluster = NodeCluster(first.url, tmp_path / "c", specs, cluster=name)
    with cluster:
        cluster.wait_ready()
        song = tone_file(tmp_path, "Survivor", 30.0, 440.0)
        with contextlib.closing(cluster.client(timeout=5.0)) as client:
            ok(client.enqueue_song(song))
            ok(client.play())
        time.sleep(1.0)
        first.kill()
        t_kill = time.monotonic()
        reply = wait_for(lambda: serving(second.url, name), 15, "a master on the second broker")
        took = time.monotonic() - t_kill
        assert reply["state"]["playback"] == "playing"
        assert took < 10, took
        # the master republished the retained state on the broker it moved to
        w = Watcher(second.url, name)
        try:
            wait_for(lambda: w.get("status") == b"online", 5, "status online on the second")
            state = wait_for(lambda: w.json("state"), 5, "the retained state")
            assert state["playback"] == "playing" and state["title"] == "Survivor"
            assert wait_for(lambda: w.json("library"), 5, "the library")[0]["title"] == "Survivor"
        finally:
            w.close()
        first.start()  # back on the same port: everyone returns to the first broker
        reply = wait_for(lambda: serving(first.url, name), 20, "a master on the first again")
        assert reply["state"]["playback"] == "playing"
        w = Watcher(first.url, name)
        try:
            wait_for(lambda: len(w.node_states(live_only=True)) == 3, 10, "all nodes on the first")
        finally:
            w.close()
    # every node, the master whose broker died included, played on through both moves
    h = sha224_file(song)
    for n in cluster.specs:
        blocks = [b for b in sinklog.read_log(cluster.sink_log(n)) if b.song == h]
        assert blocks, f"{n} never played"
        assert sinklog.gaps_ns(blocks) == [], f"{n} stopped playing during the broker failover"


def test_an_earlier_broker_counts_as_back_only_when_it_answers_mqtt(
    broker_factory: Callable[[str], BrokerProcess],
) -> None:
    import asyncio

    from nsync_lab.faultproxy import FaultProxy
    from nsync_lab.testing import free_port
    from nsync_mqtt.bus import _broker_answers, parse_broker_url

    live = broker_factory("mosquitto")
    embedded = broker_factory("amqtt")
    with FaultProxy("127.0.0.1", free_port()) as to_nothing:  # accepts TCP, no broker behind
        urls = {
            "mosquitto": (live.url, True),
            "amqtt": (embedded.url, True),
            "proxy to a dead broker": (f"mqtt://127.0.0.1:{to_nothing.port}", False),
            "closed port": (f"mqtt://127.0.0.1:{free_port()}", False),
        }
        for what, (url, expected) in urls.items():
            answered = asyncio.run(_broker_answers(parse_broker_url(url), 1.0))
            assert answered is expected, what
