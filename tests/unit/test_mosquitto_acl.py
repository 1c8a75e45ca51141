"""config/mosquitto-nsync.acl, the household Mosquitto's ACL: client users get exactly the
rights of the embedded broker's default ACL (nsync_mqtt.acl), nodes everything on the cluster's
topics. (tests/integration/test_mosquitto_secure.py runs it in a real Mosquitto.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from nsync_mqtt.acl import CLIENT_READ, CLIENT_WRITE, parse_acl

ACL_FILE = Path(__file__).parents[2] / "config" / "mosquitto-nsync.acl"
CLIENTS = ("homeassistant", "nsync-client")


def rules() -> dict[str, list[tuple[str, str]]]:
    """user -> [(access, topic)], read the way Mosquitto reads the file."""
    out: dict[str, list[tuple[str, str]]] = {}
    user = ""
    for line in ACL_FILE.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        assert words[0] in ("user", "topic"), line  # no pattern lines, no trailing comments
        if words[0] == "user":
            user = words[1]
            out[user] = []
        else:
            assert user, f"a rule for anonymous clients: {line}"
            assert len(words) == 3 and words[1] in ("read", "write", "readwrite"), line
            out[user].append((words[1], words[2]))
    return out


@pytest.mark.parametrize("user", CLIENTS)
def test_client_users_have_exactly_the_client_rights(user: str) -> None:
    mine = [(a, t.removeprefix("nsync/+/")) for a, t in rules()[user] if t.startswith("nsync/")]
    assert sorted(t for a, t in mine if a == "write") == sorted(CLIENT_WRITE)
    assert sorted(t for a, t in mine if a == "read") == sorted(CLIENT_READ)
    assert not [t for a, t in mine if a == "readwrite"]


def test_node_user_and_discovery() -> None:
    r = rules()
    assert set(r) == {"nsync-node", *CLIENTS}
    assert ("readwrite", "nsync/+/#") in r["nsync-node"]
    assert ("write", "homeassistant/device/+/config") in r["nsync-node"]
    assert ("read", "homeassistant/status") in r["nsync-node"]
    assert ("readwrite", "homeassistant/#") in r["homeassistant"]
    assert not [t for _, t in r["nsync-client"] if not t.startswith("nsync/")]


def test_the_embedded_broker_reads_the_same_file() -> None:
    acl = parse_acl(ACL_FILE.read_text(), str(ACL_FILE))
    base = "nsync/home"
    for user in CLIENTS:
        assert acl.allows(user, "c", "write", f"{base}/cmd/play")
        assert acl.allows(user, "c", "write", f"{base}/internal/chunk/all")
        assert acl.allows(user, "c", "read", f"{base}/state/title")
        assert acl.allows(user, "c", "read", f"{base}/internal/xfer/c")
        for topic in ("internal/hb", "internal/to/n1", "state", "status", "node/n1/status"):
            assert not acl.allows(user, "c", "write", f"{base}/{topic}"), topic
        assert not acl.allows(user, "c", "read", f"{base}/internal/hb")
    assert acl.allows("nsync-node", "n1", "write", f"{base}/internal/hb")
    assert not acl.allows(None, "anon", "read", f"{base}/state")
