"""Log matching across terms, through real brokers, real nodes and fault proxies.

The sequence that loses an acknowledged command when duplicates are judged by index alone:

1. the master (n1, term 1) applies X (volume 11) and sends it, but only n2 receives it;
2. n1 dies; n3, n4 or n5 becomes master (term 2) without X, while n2 is unreachable;
3. the new master commits Y (volume 22) at the same index as X: n2 comes back in time to
   "acknowledge" it, and one more node holds it, so the client hears success;
4. the new master dies too; n2, whose election timeout is the shortest left, runs for master.

Judged by index alone, n2 took Y for a duplicate of what it held, acknowledged it, and now
stands for election with X claiming to be as recent as Y: elected, it makes every node play X,
and the acknowledged Y is gone. Judged by (term, index), n2 met a conflict, took the master's
state (dropping X) and holds Y like the others.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nsync_lab.faultproxy import FaultProxy
from nsync_lab.testing import (
    BrokerProcess,
    NodeCluster,
    NodeSpec,
    RawClient,
    Watcher,
    unique_cluster_name,
    wait_for,
)
from nsync_mqtt.persist import StateFile

pytestmark = pytest.mark.integration

IDS = ["n1", "n2", "n3", "n4", "n5"]
# Heartbeats every 0.5 s: a returning node hears few of them before the next command. n1 times
# out first (the first master). n2 times out after 2.2 s without a master, the others after 2.0
# to 4.0 s: once the second master dies, n2 is the one that runs (a pre-vote is granted by a peer
# that has not heard a master for its own minimum, 2.0 s), and the others grant it.
HEARTBEAT_S = 0.5
TIMEOUTS = {
    "n1": (1.5, 1.6),
    "n2": (2.2, 2.25),
    "n3": (2.0, 4.0),
    "n4": (2.0, 4.0),
    "n5": (2.0, 4.0),
}
X, Y = 11, 22


def durable(workdir: Path, node: str) -> dict[str, Any]:
    """The player state ``node`` keeps on disk (snapshot and log)."""
    return StateFile(workdir / node / "state.json").read().state.to_dict()


def agreed_index(w: Watcher) -> int | None:
    """The operation index every node reports, if they all report the same one."""
    states = w.node_states(live_only=True)
    indices = {s.get("index") for s in states.values()}
    if len(states) == len(IDS) and len(indices) == 1:
        index = indices.pop()
        return index if isinstance(index, int) else None
    return None


def settled(w: Watcher) -> bool:
    """Every node reports the same operation index and playlist."""
    states = w.node_states(live_only=True)
    seen = {(s.get("index"), s.get("playlist_hash")) for s in states.values()}
    return len(states) == len(IDS) and len(seen) == 1


def master_of(w: Watcher, candidates: list[str], above_term: int) -> str | None:
    states = w.node_states(live_only=True)
    for node in candidates:
        s = states.get(node, {})
        if s.get("role") == "master" and s.get("term", 0) > above_term:
            return node
    return None


@pytest.fixture
def setup(
    broker_factory: Callable[[str], BrokerProcess], tmp_path: Path
) -> Iterator[tuple[NodeCluster, dict[str, FaultProxy], BrokerProcess]]:
    broker = broker_factory("mosquitto")
    with contextlib.ExitStack() as stack:
        proxies = {n: stack.enter_context(FaultProxy("127.0.0.1", broker.port)) for n in IDS}
        specs = [
            NodeSpec(
                n,
                broker_url=f"mqtt://127.0.0.1:{proxies[n].port}",
                timing={"election_timeout_min_s": lo, "election_timeout_max_s": hi},
            )
            for n, (lo, hi) in TIMEOUTS.items()
        ]
        cluster = NodeCluster(
            broker.url,
            tmp_path,
            specs,
            cluster=unique_cluster_name(),
            timing={"heartbeat_interval_s": HEARTBEAT_S},
        )
        stack.callback(cluster.stop)
        yield cluster, proxies, broker


def test_an_acknowledged_command_survives_a_conflicting_uncommitted_op(
    setup: tuple[NodeCluster, dict[str, FaultProxy], BrokerProcess],
) -> None:
    cluster, proxies, broker = setup
    cluster.start()
    states = cluster.wait_ready(timeout_s=40.0)
    assert states["n1"]["role"] == "master", states
    with (
        cluster.watch() as w,
        RawClient(broker.url, cluster.cluster, [f"nsync/{cluster.cluster}/reply/#"]) as client,
    ):
        base = client.request("volume", {"volume": 30})
        assert base["success"], base
        index = wait_for(lambda: agreed_index(w), 10.0, "every node at the master's index")

        # 1. X reaches n2 alone
        for n in ("n3", "n4", "n5"):
            proxies[n].blackhole()
        client.publish(f"nsync/{cluster.cluster}/cmd/volume", "11")  # no reply_to: no reply
        wait_for(
            lambda: durable(cluster.workdir, "n2")["index"] == index + 1,
            10.0,
            "n2 to hold X",
        )
        assert durable(cluster.workdir, "n2")["volume"] == X

        # 2. n1 dies; n2 is held away while one of n3-n5 becomes master
        cluster.stop_node("n1", signal.SIGKILL)
        proxies["n2"].blackhole()
        for n in ("n3", "n4", "n5"):
            proxies[n].cut()  # what was held for them (X) is lost with the connection
            proxies[n].heal()
        second = wait_for(
            lambda: master_of(w, ["n3", "n4", "n5"], above_term=1), 20.0, "a second master"
        )
        c, d = (n for n in ("n3", "n4", "n5") if n != second)

        # 3. Y at X's index: n2 returns, d is held away
        proxies[d].blackhole()
        proxies["n2"].heal()
        reply = client.request("volume", {"volume": Y}, timeout_s=10.0)
        assert reply["success"], reply  # f+1 nodes said they hold Y

        # 4. the second master dies; d returns without what was held for it
        cluster.stop_node(second, signal.SIGKILL)
        proxies[d].cut()
        proxies[d].heal()
        wait_for(lambda: master_of(w, ["n2", c, d], above_term=2), 20.0, "a third master")

        # the killed nodes come back too: every node must end with Y
        cluster.start_node("n1")
        cluster.start_node(second)
        wait_for(lambda: settled(w), 30.0, "every node at one index")
        volume = wait_for(lambda: w.get("state/volume"), 5.0, "the retained volume")
        assert int(volume) == Y, f"the cluster plays volume {volume}, Y ({Y}) was acknowledged"
    codes = cluster.stop()
    assert all(code == 0 for code in codes.values()), (codes, cluster.logs_tail())
    held = {n: durable(cluster.workdir, n) for n in IDS}
    assert {s["volume"] for s in held.values()} == {Y}, held
    assert len({json.dumps(s, sort_keys=True) for s in held.values()}) == 1, held
