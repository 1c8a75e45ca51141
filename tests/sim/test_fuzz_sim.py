"""Property-based fuzzing (hypothesis) of every topic a simulated node subscribes to: raw
bytes, wrong JSON types, huge and non-finite numbers, deep nesting, unicode, path-like names,
mutated and forged internal messages, replays of real ones, bad commands (nsync_lab.fuzz).
A warmed-up 3-node cluster (a master, three songs, a volume, nothing playing) takes only junk:
no exception escapes a node, no master, term, playlist, playback, volume, log position or state
file changes, every command with a reply_to is refused with a message. The short profile; the
long one (>= 100,000 inputs) is bench/bench_fuzz.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nsync_lab.fuzz import Junk, SimFuzzer, batches, mosquitto_refuses_topic
from nsync_mqtt.master import Master
from nsync_mqtt.seal import Sealer

EXAMPLES = 30  # batches of 10-20 inputs per cluster kind: a few seconds


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    logging.disable(logging.CRITICAL)  # the nodes' own logs of what they refuse
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_junk_on_every_subscribed_topic_changes_nothing(signed: bool) -> None:
    fz = SimFuzzer(seed=7, signed=signed)
    before = fz.rejected()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # no shrinking: a failure names its exact inputs
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def junk_changes_nothing(data: st.DataObject) -> None:
        problems = fz.feed(data.draw(batches(fz.ctx, 20), label="batch"))
        assert not problems, "\n".join(map(str, problems))

    junk_changes_nothing()
    t = fz.tally
    print(json.dumps({k: v for k, v in t.as_dict().items() if k != "problems"}))
    # the inputs reached every kind of topic, and were refused where they should be
    assert t.inputs >= EXAMPLES * 10
    assert t.replies_checked >= 5  # commands with a reply_to were among them (how many varies)
    kinds = {k.split()[0] for k in t.by_kind}
    assert {"internal", "replay", "node", "unknown", "bad"} <= kinds, t.by_kind
    rejected = fz.rejected()
    if signed:  # refused before they were parsed, by reason
        for reason in ("unsigned", "bad signature", "not a peer", "replayed"):
            assert rejected.get(reason, 0) > before.get(reason, 0), rejected
    else:  # read, and refused by the checks of every field
        assert fz.refusals.get("bad internal message", 0) > 0, fz.refusals
        assert t.skipped > 0  # well-formed forgeries: only a key keeps them out


def hb(fz: SimFuzzer, term: int) -> bytes:
    body = {"v": 1, "t": "hb", "src": fz.ctx.master, "term": term, "index": 0, "log_term": 0}
    body["plist"] = "d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f"
    return json.dumps(body).encode()


def test_a_forged_heartbeat_without_the_key_changes_nothing_and_with_it_would() -> None:
    """The checks can fail: the same heartbeat, a thousand terms ahead under the master's id,
    is refused sealed with a wrong key, and deposes the master sealed with the cluster's."""
    fz = SimFuzzer(seed=3, signed=True)
    topic = f"{fz.base}/internal/hb"
    payload = hb(fz, fz.ctx.term + 1000)
    wrong = Sealer(bytes(32), fz.ctx.cluster, fz.ctx.master, fz.sim.nodes["n0"].sealer.boot)  # type: ignore[union-attr]
    before = fz.rejected().get("bad signature", 0)
    assert fz.feed([Junk("internal/hb", wrong.seal(topic, payload), "forged")]) == []
    assert fz.rejected().get("bad signature", 0) == before + 2  # both other nodes refused it
    key = fz.sim.key
    assert key is not None
    right = Sealer(key, fz.ctx.cluster, fz.ctx.master, fz.sim.nodes[fz.ctx.master].sealer.boot)  # type: ignore[union-attr]
    right.seq = 10**6  # past anything the master sent
    problems = fz.feed([Junk("internal/hb", right.seal(topic, payload), "signed")])
    assert [p.what for p in problems] == ["state change"], problems
    assert f"term: {fz.ctx.term} -> {fz.ctx.term + 1000}" in problems[0].detail


@pytest.mark.parametrize(
    ("verb", "body"),
    [
        ("volume", {"volume": -5}),  # once taken as "-5", relative: the volume went down
        ("volume", {"volume": -0.5}),
        ("seek", {"seconds": 1e308}),  # once an OverflowError out of the master
        ("remove", {"index": "²"}),  # a digit int() refuses
        ("move", {"from": 0, "to": "9" * 5000}),
    ],
)
def test_inputs_the_fuzz_found_are_refused(verb: str, body: dict[str, object]) -> None:
    fz = SimFuzzer(seed=5, signed=True)
    payload = json.dumps({**body, "reply_to": "@reply@"}).encode()
    problems = fz.feed([Junk(f"cmd/{verb}", payload, "found", expect_reply=True)])
    assert problems == [], "\n".join(map(str, problems))
    assert fz.tally.replies_checked == 1


def test_an_exception_in_a_node_is_reported_as_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks can fail: a command handler that raises is caught at the node and named."""
    fz = SimFuzzer(seed=5, signed=True)

    def boom(self: Master, now: float, verb: str, payload: bytes) -> None:
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(Master, "command", boom)
    problems = fz.feed([Junk("cmd/seek", b'{"seconds": 1e308}', "found")])
    assert [p.what for p in problems] == ["crash"], problems
    assert "OverflowError" in problems[0].detail and "1e308" in problems[0].inputs[-1]


@pytest.mark.parametrize(
    ("topic", "refused"),
    [
        ("nsync/home/cmd/play", False),
        ("nsync/home/cmd/vol\u00fcme \u266b \U0001f3b5", False),
        ("nsync/home/cmd/volume\t", True),
        ("nsync/home/cmd/\x00", True),
        ("nsync/home/cmd/\x7f", True),
        ("nsync/home/cmd/\x85", True),
        ("nsync/home/cmd/\ufdd0", True),
        ("nsync/home/cmd/\ufffe", True),
        ("nsync/home/cmd/\U0001ffff", True),
    ],
)
def test_topics_mosquitto_would_drop_the_fuzzing_client_for(topic: str, refused: bool) -> None:
    assert mosquitto_refuses_topic(topic) is refused
