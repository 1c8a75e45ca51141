"""The embedded broker's ACL (Mosquitto acl_file format), its password file and its refusal to
listen beyond the machine without one: pure logic, no broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from nsync_mqtt.acl import covers, default_acl, matches, overlaps, parse_acl
from nsync_mqtt.broker_embed import hash_password, parse_password_file, weak_hash
from nsync_mqtt.config import check_exposure, is_loopback, load_node_config
from nsync_mqtt.errors import ConfigError


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/#", "a/b/c", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("a/b", "a/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


def test_covers_and_overlaps() -> None:
    assert covers("a/#", "a/+/c")
    assert covers("a/+", "a/+")
    assert not covers("a/b", "a/+")  # the filter reaches a/c too
    assert not covers("a/+", "a/#")
    assert overlaps("a/b", "#") and overlaps("a/+", "a/b") and overlaps("a/#", "a")
    assert not overlaps("a/b", "a/c") and not overlaps("a/b", "a/b/c")


ACL_TEXT = """
# anonymous clients
topic read public/#

user homeassistant
topic write nsync/home/cmd/#   # commands
topic read nsync/home/state
topic deny nsync/home/internal/#
topic nsync/home/scratch

pattern readwrite users/%u/#
pattern write clients/%c
"""


def test_parse_acl_grants_per_user_and_pattern() -> None:
    acl = parse_acl(ACL_TEXT)
    ha = "homeassistant"
    assert acl.allows(ha, "c1", "write", "nsync/home/cmd/play")
    assert not acl.allows(ha, "c1", "read", "nsync/home/cmd/play")  # write only
    assert acl.allows(ha, "c1", "read", "nsync/home/state")
    assert not acl.allows(ha, "c1", "write", "nsync/home/state")
    assert acl.allows(ha, "c1", "write", "nsync/home/scratch")  # no access word: readwrite
    assert acl.allows(ha, "c1", "read", "nsync/home/scratch")
    assert not acl.allows(ha, "c1", "read", "nsync/home/internal/hb")
    assert not acl.allows(ha, "c1", "read", "public/news")  # the anonymous rules are not its
    assert acl.allows(None, "x", "read", "public/news")
    assert not acl.allows(None, "x", "write", "public/news")
    # patterns apply to everyone, with %u and %c filled in
    assert acl.allows(ha, "c1", "write", "users/homeassistant/a")
    assert not acl.allows(ha, "c1", "write", "users/bob/a")
    assert not acl.allows(None, "c1", "write", "users//a")  # %u without a user never matches
    assert acl.allows("bob", "c7", "write", "clients/c7")
    assert not acl.allows("bob", "c7", "write", "clients/c8")
    # nothing granted: refused
    assert not acl.allows("bob", "c7", "read", "elsewhere")


def test_acl_subscriptions() -> None:
    acl = parse_acl(ACL_TEXT)
    ha = "homeassistant"
    assert acl.allows(ha, "c", "subscribe", "nsync/home/state")
    # a deny inside the filter refuses it
    assert not acl.allows(ha, "c", "subscribe", "nsync/home/internal/+")
    # a wide filter is allowed where a read grant overlaps it: deliveries are checked one by one
    assert acl.allows(ha, "c", "subscribe", "#")
    assert not acl.allows("bob", "c", "subscribe", "nsync/#")  # bob may read nothing there


def test_a_deny_wins_over_an_earlier_grant() -> None:
    acl = parse_acl("user u\ntopic read a/#\ntopic deny a/secret\n")
    assert acl.allows("u", "c", "read", "a/open")
    assert not acl.allows("u", "c", "read", "a/secret")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("group x", "expected user, topic or pattern"),
        ("user", "`user NAME`"),
        ("topic sometimes a/b", "read|write|readwrite|deny"),
        ("topic read a/#/b", "# must be a whole last level"),
        ("topic read a/b+", "+ must be a whole level"),
    ],
)
def test_parse_acl_names_the_bad_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="line 2") as err:
        parse_acl("# first\n" + text, "acl")
    assert message in str(err.value)


def test_default_acl_trusts_node_ids_and_fences_clients() -> None:
    acl = default_acl("home", ["kitchen", "living", "bedroom"])
    for action in ("read", "write"):
        assert acl.allows("kitchen", "n", action, "nsync/home/internal/hb")
        assert acl.allows("kitchen", "n", action, "nsync/home/state")
    client = "homeassistant"
    assert acl.allows(client, "ha", "write", "nsync/home/cmd/play")
    assert acl.allows(client, "ha", "write", "nsync/home/upload")
    assert acl.allows(client, "ha", "write", "nsync/home/internal/chunk/all")
    assert acl.allows(client, "ha", "read", "nsync/home/state")
    assert acl.allows(client, "ha", "read", "nsync/home/node/kitchen/state")
    assert acl.allows(client, "ha", "read", "nsync/home/reply/ha")
    assert acl.allows(client, "ha", "read", "nsync/home/internal/xfer/ha")
    for topic in ("internal/hb", "internal/op", "internal/chunk/kitchen", "state", "library"):
        assert not acl.allows(client, "ha", "write", f"nsync/home/{topic}"), topic
    for topic in ("internal/hb", "internal/chunk/all", "cmd/play"):
        assert not acl.allows(client, "ha", "read", f"nsync/home/{topic}"), topic
    # the broker may serve other things: outside the cluster's prefix a client may do anything
    assert acl.allows(client, "ha", "write", "homeassistant/media_player/x/config")
    assert acl.allows(client, "ha", "write", "nsync/other/internal/hb")
    # subscriptions: wide ones are allowed, deliveries are filtered; an internal one is not
    assert acl.allows(client, "ha", "subscribe", "#")
    assert acl.allows(client, "ha", "subscribe", "nsync/home/#")
    assert acl.allows(client, "ha", "subscribe", "nsync/home/state/#")
    assert not acl.allows(client, "ha", "subscribe", "nsync/home/internal/hb")


def test_password_file_lines() -> None:
    hashed = hash_password("pw")
    users = parse_password_file(f"# users\n\nalice:{hashed}\nbob:{hashed}\n", "pw")
    assert set(users) == {"alice", "bob"}
    for bad in ("alice", "alice:plaintext", ":" + hashed, "bob:$6$sha512crypt$xyz"):
        with pytest.raises(ConfigError, match="line 1: expected user:argon2-hash"):
            parse_password_file(bad, "pw")


def test_weak_hashes_are_those_under_every_owasp_minimum() -> None:
    def h(m: int, t: int) -> str:
        return f"$argon2id$v=19$m={m},t={t},p=1$c2FsdA$aGFzaA"

    assert not weak_hash(h(19456, 2)) and not weak_hash(h(47104, 1))
    assert not weak_hash(h(7168, 5)) and not weak_hash(h(65536, 3))
    assert weak_hash(h(2048, 1)) and weak_hash(h(19455, 2)) and weak_hash(h(19456, 1))
    assert weak_hash("$6$rounds=5000$salt$hash")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("kitchen.local", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_broker_beyond_this_machine_needs_a_password_file(tmp_path: Path) -> None:
    check_exposure("listen", "127.0.0.1", None)
    check_exposure("listen", "0.0.0.0", tmp_path / "pw")
    with pytest.raises(ConfigError, match="open to the whole network"):
        check_exposure("listen", "0.0.0.0", None)
    base = {"id": "a", "peers": ["a"], "data_dir": str(tmp_path / "d")}
    with pytest.raises(ConfigError, match=r"embed_broker: a broker listening on 0\.0\.0\.0"):
        load_node_config(None, {**base, "embed_broker": "0.0.0.0:1883"})
    with pytest.raises(ConfigError, match="an ACL needs embed_broker_password_file"):
        load_node_config(
            None, {**base, "embed_broker": "127.0.0.1:1883", "embed_broker_acl_file": "acl"}
        )
    cfg = load_node_config(
        None,
        {**base, "embed_broker": "0.0.0.0:1883", "embed_broker_password_file": "pw"},
    )
    assert cfg.embed_broker_password_file == Path("pw")
