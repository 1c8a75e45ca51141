"""The simulated MQTT broker: matching, retained, order, duplicates, cuts, loss, restarts."""

from __future__ import annotations

from typing import Any

import pytest

from nsync_lab.sim import BrokerUnavailable, Conn, SimBroker, Will, World, topic_matches
from nsync_lab.sim.broker import check_filter

Got = tuple[float, str, bytes, bool]


class Client:
    """Records (time, topic, payload, retain) deliveries and disconnect notices."""

    def __init__(self, world: World, broker: SimBroker, cid: str, will: Will | None = None):
        self.world = world
        self.got: list[Got] = []
        self.dropped: list[float] = []
        self.conn: Conn = broker.connect(cid, self.on_message, self.on_disconnect, will)

    def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        self.got.append((self.world.now, topic, payload, retain))

    def on_disconnect(self) -> None:
        self.dropped.append(self.world.now)

    def payloads(self) -> list[bytes]:
        return [g[2] for g in self.got]


def setup(seed: int = 1, **kw: Any) -> tuple[World, SimBroker]:
    w = World(seed)
    return w, SimBroker(w, **kw)


@pytest.mark.parametrize(
    ("pattern", "topic", "match"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a/x/c", True),
        ("+/+", "/x", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "x/y", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/+", "a", False),
    ],
)
def test_topic_matching(pattern: str, topic: str, match: bool) -> None:
    assert topic_matches(pattern, topic) is match


def test_bad_filters_and_topics_are_refused() -> None:
    w, b = setup()
    c = Client(w, b, "c")
    for bad in ("a/#/b", "a/b+", "", "a#"):
        with pytest.raises(ValueError):
            check_filter(bad)
    with pytest.raises(ValueError):
        c.conn.subscribe("a/#/b")
    with pytest.raises(ValueError):
        b.connect("d", c.on_message, will=Will("a/+", b"x"))


def test_a_publish_reaches_subscribers_after_two_hops_of_latency() -> None:
    w, b = setup()
    sub = Client(w, b, "sub")
    other = Client(w, b, "other")
    pub = Client(w, b, "pub")
    sub.conn.subscribe("room/+/state")
    other.conn.subscribe("elsewhere")
    w.run_until(0.01)
    assert pub.conn.publish("room/1/state", b"on") is True
    w.run_until(0.01 + 0.0002 - 1e-9)  # two hops of at least 0.1 ms each
    assert sub.got == []
    w.run_until(0.02)
    assert len(sub.got) == 1
    t, topic, payload, retain = sub.got[0]
    assert (topic, payload, retain) == ("room/1/state", b"on", False)
    assert 0.0102 <= t <= 0.011
    assert other.got == [] and pub.got == []
    assert b.stats.delivered == 1


def test_a_subscription_takes_effect_when_it_reaches_the_broker() -> None:
    w, b = setup()
    sub = Client(w, b, "sub")
    pub = Client(w, b, "pub")
    b.set_delay("sub", 0.01, 0.0, up=True, down=False)
    sub.conn.subscribe("t")
    pub.conn.publish("t", b"before the SUBSCRIBE arrives")
    w.run_until(0.02)
    pub.conn.publish("t", b"after")
    w.run_until(0.03)
    assert sub.payloads() == [b"after"]


def test_overlapping_filters_deliver_once_and_unsubscribe_stops_delivery() -> None:
    w, b = setup()
    sub = Client(w, b, "sub")
    sub.conn.subscribe("a/#")
    sub.conn.subscribe("a/+")
    sub.conn.subscribe("a/+")
    w.run_until(0.01)
    sub.conn.publish("a/b", b"1")
    w.run_until(0.02)
    sub.conn.unsubscribe("a/#")
    sub.conn.unsubscribe("a/+")
    w.run_until(0.03)
    sub.conn.publish("a/b", b"2")
    w.run_until(0.04)
    assert sub.payloads() == [b"1"]


def test_retained_is_sent_on_subscribe_live_copies_are_not_retained_and_empty_clears() -> None:
    w, b = setup()
    pub = Client(w, b, "pub")
    live = Client(w, b, "live")
    live.conn.subscribe("cfg/#")
    w.run_until(0.01)
    pub.conn.publish("cfg/a", b"A", retain=True)
    pub.conn.publish("cfg/b", b"B", retain=True)
    pub.conn.publish("cfg/c", b"C")  # not retained
    w.run_until(0.02)
    assert [(g[1], g[2], g[3]) for g in live.got] == [
        ("cfg/a", b"A", False),
        ("cfg/b", b"B", False),
        ("cfg/c", b"C", False),
    ]
    assert b.retained == {"cfg/a": b"A", "cfg/b": b"B"}

    late = Client(w, b, "late")
    late.conn.subscribe("cfg/+")
    w.run_until(0.03)
    assert [(g[1], g[2], g[3]) for g in late.got] == [("cfg/a", b"A", True), ("cfg/b", b"B", True)]

    pub.conn.publish("cfg/a", b"", retain=True)  # clears, and is delivered live as empty
    w.run_until(0.04)
    assert live.got[-1][1:] == ("cfg/a", b"", False)
    assert b.retained == {"cfg/b": b"B"}
    later = Client(w, b, "later")
    later.conn.subscribe("cfg/a")
    w.run_until(0.05)
    assert later.got == []


def test_fifo_per_connection_under_heavy_jitter() -> None:
    w, b = setup(seed=3, up_delay=(0.001, 0.001), down_delay=(0.001, 0.001), dup_p=0.2)
    sub = Client(w, b, "sub")
    pub = Client(w, b, "pub")
    sub.conn.subscribe("seq")
    w.run_until(0.1)
    for i in range(300):
        w.at(0.1 + i * 0.0001, pub.conn.publish, "seq", str(i).encode())
    w.run_until(1.0)
    seen = [int(p) for p in sub.payloads()]
    assert len(seen) > 300  # duplicates happened
    assert seen == sorted(seen)  # and nothing overtook anything
    assert sorted(set(seen)) == list(range(300))
    times = [g[0] for g in sub.got]
    assert times == sorted(times)


def test_messages_from_different_connections_get_reordered() -> None:
    w, b = setup(seed=5, up_delay=(0.001, 0.0009))
    sub = Client(w, b, "sub")
    pubs = [Client(w, b, f"p{i}") for i in range(2)]
    sub.conn.subscribe("x/+")
    w.run_until(0.1)
    for i in range(50):
        t = 0.1 + i * 0.01
        w.at(t, pubs[0].conn.publish, "x/0", str(i).encode())
        w.at(t + 0.0001, pubs[1].conn.publish, "x/1", str(i).encode())
    w.run_until(1.0)
    order = [(int(g[2]), g[1]) for g in sub.got]
    assert len(order) == 100
    swapped = sum(1 for i in range(50) if order.index((i, "x/1")) < order.index((i, "x/0")))
    assert 0 < swapped < 50


def test_duplicates_arrive_back_to_back() -> None:
    w, b = setup(dup_p=1.0)
    sub = Client(w, b, "sub")
    pub = Client(w, b, "pub")
    sub.conn.subscribe("d")
    w.run_until(0.01)
    pub.conn.publish("d", b"1")
    pub.conn.publish("d", b"2")
    w.run_until(0.1)
    # a duplicated publish is routed twice, and each routing is duplicated on the way down
    assert sub.payloads() == [b"1"] * 4 + [b"2"] * 4
    assert b.stats.duplicates == 2 + 4


def test_a_cut_downlink_loses_deliveries_and_a_cut_uplink_loses_publishes() -> None:
    w, b = setup()
    a = Client(w, b, "a")
    c = Client(w, b, "c")
    for x in (a, c):
        x.conn.subscribe("t")
    w.run_until(0.01)
    b.cut("a", up=False, down=True)  # a still talks, hears nothing
    a.conn.publish("t", b"from a")
    c.conn.publish("t", b"from c")
    w.run_until(0.02)
    assert a.got == []
    assert c.payloads() == [b"from a", b"from c"]
    b.heal("a")
    b.cut("c", up=True, down=False)  # c hears, but its publishes vanish
    a.conn.publish("t", b"a2")
    c.conn.publish("t", b"c2")
    w.run_until(0.03)
    assert a.payloads() == [b"a2"]
    assert c.payloads()[-1] == b"a2"
    assert b"c2" not in a.payloads() + c.payloads()
    assert a.conn.connected and c.conn.connected  # a cut is a silent black hole
    b.heal("c")
    c.conn.publish("t", b"c3")
    w.run_until(0.04)
    assert a.payloads()[-1] == b"c3"


def test_messages_in_flight_on_a_link_when_it_is_cut_are_lost_even_after_heal() -> None:
    w, b = setup(down_delay=(0.01, 0.0))
    sub = Client(w, b, "sub")
    sub.conn.subscribe("t")
    w.run_until(0.1)
    sub.conn.publish("t", b"in flight")
    w.run_until(0.105)
    b.cut("sub")
    b.heal("sub")
    w.run_until(0.2)
    assert sub.got == []
    assert b.stats.lost_cut == 1


def test_a_subscribe_caught_by_a_cut_takes_effect_after_the_heal_not_never() -> None:
    w, b = setup(up_delay=(0.01, 0.0))
    pub = Client(w, b, "pub")
    sub = Client(w, b, "sub")
    sub.conn.subscribe("in-flight")  # reaches the broker at 0.01; the cut comes first
    w.run_until(0.005)
    b.cut("sub", up=True, down=False)
    sub.conn.subscribe("sent-while-cut")
    sub.conn.publish("in-flight", b"lost")  # publishes on a cut hop are still lost
    w.run_until(0.5)
    assert sub.conn.filters == []
    pub.conn.publish("in-flight", b"before the heal")
    w.run_until(0.6)
    assert sub.got == []
    b.heal("sub")
    w.run_until(0.7)
    assert sorted(sub.conn.filters) == ["in-flight", "sent-while-cut"]
    pub.conn.publish("in-flight", b"after")
    pub.conn.publish("sent-while-cut", b"after too")
    w.run_until(0.8)
    assert sub.payloads() == [b"after", b"after too"]


def test_a_held_subscribe_dies_with_its_connection() -> None:
    w, b = setup()
    sub = Client(w, b, "sub")
    b.cut("sub", up=True, down=False)
    sub.conn.subscribe("t")
    b.drop("sub")
    b.heal("sub")
    w.run_until(0.1)
    assert sub.conn.filters == [] and not sub.conn.connected


def test_a_cut_link_refuses_connect_and_can_drop_the_connection_like_a_keepalive() -> None:
    w, b = setup()
    watcher = Client(w, b, "watcher")
    watcher.conn.subscribe("will/#")
    node = Client(w, b, "node", will=Will("will/node", b"gone", retain=True))
    w.run_until(0.01)
    b.cut("node", up=True, down=False, drop_after_s=1.5)
    w.run_until(1.0)
    assert node.conn.connected
    w.run_until(2.0)
    assert not node.conn.connected
    assert len(node.dropped) == 1
    assert watcher.payloads() == [b"gone"]
    assert b.retained["will/node"] == b"gone"
    with pytest.raises(BrokerUnavailable):
        b.connect("node", node.on_message)
    b.heal("node")
    assert b.connect("node", node.on_message).connected


def test_loss_on_disconnect_both_directions_and_publish_after_disconnect_is_dropped() -> None:
    w, b = setup(up_delay=(0.001, 0.0), down_delay=(0.001, 0.0))
    sub = Client(w, b, "sub")
    pub = Client(w, b, "pub")
    sub.conn.subscribe("t")
    w.run_until(0.01)
    pub.conn.publish("t", b"lost on the way up")
    pub.conn.disconnect()
    w.run_until(0.02)
    assert sub.got == []
    assert pub.conn.publish("t", b"x") is False
    assert pub.conn.subscribe("t") is False
    assert pub.dropped == []  # a clean disconnect calls no callback

    pub2 = Client(w, b, "pub")
    pub2.conn.publish("t", b"lost on the way down")
    w.run_until(0.0215)  # at the broker, not yet at sub
    assert b.stats.routed == 1
    sub.conn.disconnect()
    w.run_until(0.03)
    assert sub.got == []
    assert b.stats.lost_disconnect == 2
    assert b.stats.dropped_offline == 2


def test_clean_disconnect_sends_no_will_takeover_does() -> None:
    w, b = setup()
    watcher = Client(w, b, "watcher")
    watcher.conn.subscribe("lwt")
    a = Client(w, b, "a", will=Will("lwt", b"a died"))
    w.run_until(0.01)
    a.conn.disconnect()
    a2 = Client(w, b, "a", will=Will("lwt", b"a died"))
    a3 = Client(w, b, "a")  # takes over a2's client id
    w.run_until(0.02)
    assert watcher.payloads() == [b"a died"]
    assert not a2.conn.connected and len(a2.dropped) == 1
    assert a3.conn.connected and b.conns["a"] is a3.conn


def test_broker_restart_loses_everything_and_clients_must_reconnect() -> None:
    w, b = setup(down_delay=(0.005, 0.0))
    sub = Client(w, b, "sub")
    pub = Client(w, b, "pub")
    sub.conn.subscribe("t")
    w.run_until(0.1)
    pub.conn.publish("t", b"retained", retain=True)
    w.run_until(0.1005)  # at the broker, on its way down to sub
    assert b.retained == {"t": b"retained"}
    b.restart(1.0)
    assert not b.up and b.retained == {}
    assert not sub.conn.connected and not pub.conn.connected
    w.run_until(0.5)
    assert sub.got == []
    assert sub.dropped == [pytest.approx(0.1055)] and len(pub.dropped) == 1
    with pytest.raises(BrokerUnavailable):
        b.connect("sub", sub.on_message)
    w.run_until(1.2)
    assert b.up
    sub.conn = b.connect("sub", sub.on_message)
    pub.conn = b.connect("pub", pub.on_message)
    pub.conn.publish("t", b"not subscribed yet")
    w.run_until(1.3)
    assert sub.got == []
    sub.conn.subscribe("t")
    w.run_until(1.4)
    assert sub.got == []  # the retained message died with the broker
    pub.conn.publish("t", b"after")
    w.run_until(1.5)
    assert sub.payloads() == [b"after"]
    assert b.stats.restarts == 1


def _deliveries(seed: int) -> list[Got]:
    w, b = setup(seed=seed, up_delay=(0.001, 0.001), down_delay=(0.001, 0.001), dup_p=0.1)
    subs = [Client(w, b, f"s{i}") for i in range(3)]
    for s in subs:
        s.conn.subscribe("#")
    w.run_until(0.1)
    for i in range(100):
        w.at(0.1 + i * 0.0003, subs[i % 3].conn.publish, f"t/{i % 3}", str(i).encode())
    w.run_until(1.0)
    return [g for s in subs for g in s.got]


def test_same_seed_same_deliveries() -> None:
    a = _deliveries(11)
    assert len(a) >= 300
    assert a == _deliveries(11)
    assert a != _deliveries(12)


def test_fan_out_throughput_smoke() -> None:
    w, b = setup()
    counts = [0] * 5

    def make(i: int) -> Conn:
        def on_message(topic: str, payload: bytes, retain: bool) -> None:
            counts[i] += 1

        return b.connect(f"n{i}", on_message)

    conns = [make(i) for i in range(5)]
    for c in conns:
        c.subscribe("cluster/#")
    w.run_until(0.01)
    for i in range(2000):
        w.at(0.01 + i * 0.0001, conns[i % 5].publish, "cluster/x", b"p")
    w.run_until(1.0)
    assert counts == [2000] * 5
