"""A node that runs the embedded broker itself, protected by a password file made with
`nsync broker --add-user`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nsync_lab.testing import NodeCluster, NodeSpec, RawClient, free_port
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.errors import BrokerError

pytestmark = pytest.mark.integration


def add_user(password_file: Path, user: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "nsync_mqtt",
            "broker",
            "--password-file",
            str(password_file),
            "--add-user",
            user,
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_node_with_embedded_password_protected_broker(tmp_path: Path) -> None:
    """Logins are checked against the password file; the default ACL lets the node (logged in
    as its id) do everything and other users send commands and read state, but neither read
    nor publish the cluster's internal topics or its state."""
    pw = tmp_path / "passwords"
    assert add_user(pw, "solo", "node-pw").returncode == 0
    assert add_user(pw, "alice", "s3cret").returncode == 0
    assert add_user(pw, "bob", "other").returncode == 0
    assert add_user(pw, "alice", "n3w-s3cret").returncode == 0  # replaces alice's line
    lines = pw.read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["solo", "bob", "alice"]
    assert "s3cret" not in pw.read_text()
    assert pw.stat().st_mode & 0o077 == 0

    port = free_port()
    spec = NodeSpec(
        "solo",
        extra=["--embed-broker", f"127.0.0.1:{port}", "--embed-broker-password-file", str(pw)],
    )
    node_url = f"mqtt://solo:node-pw@127.0.0.1:{port}"
    cluster = NodeCluster(node_url, tmp_path / "c", [spec], signed=False)
    base = f"nsync/{cluster.cluster}"
    with cluster:
        cluster.wait_ready(calibrated=False)
        with NSyncClient(f"mqtt://bob:other@127.0.0.1:{port}", cluster=cluster.cluster) as client:
            reply = client.status()
            assert reply["success"], reply
            assert reply["state"]["master"] == "solo"
            term = reply["state"]["term"]
        with pytest.raises(BrokerError, match="refused"):
            NSyncClient(f"mqtt://alice:s3cret@127.0.0.1:{port}", timeout=2).connect()
        with pytest.raises(BrokerError, match="refused"):
            NSyncClient(f"mqtt://127.0.0.1:{port}", timeout=2).connect()

        # a node user hears the internal topics; a client user subscribed to everything hears
        # the state but nothing internal; a client user's internal and state publishes are
        # dropped by the broker (this cluster has no key: the ACL alone stops the forgery)
        inside = RawClient(node_url, cluster.cluster, [f"{base}/internal/#"])
        spy = RawClient(f"mqtt://bob:other@127.0.0.1:{port}", cluster.cluster, ["#"])
        forger = RawClient(
            f"mqtt://alice:n3w-s3cret@127.0.0.1:{port}", cluster.cluster, [f"{base}/status"]
        )
        try:
            forged_hb = {"v": 1, "t": "hb", "src": "solo", "term": term + 1000, "forged": True}
            forger.publish(f"{base}/internal/hb", json.dumps(forged_hb))
            forger.publish(f"{base}/state", b'{"forged": true}', retain=True)
            inside.wait(lambda m: m.topic == f"{base}/internal/hb", "the master's heartbeat")
            spy.wait(lambda m: m.topic.startswith(f"{base}/node/"), "a node status")
            with NSyncClient(f"mqtt://bob:other@127.0.0.1:{port}", cluster=cluster.cluster) as c:
                reply = c.status()  # a command round trip after the forgeries
            assert reply["success"] and reply["state"]["term"] == term, reply
            assert not [m for m in inside.since(0) if b"forged" in m.payload]
            assert not [m for m in spy.since(0) if b"forged" in m.payload]
            assert not [m for m in spy.since(0) if m.topic.startswith(f"{base}/internal/")]
            late = RawClient(f"mqtt://bob:other@127.0.0.1:{port}", cluster.cluster, [f"{base}/#"])
            try:
                late.wait(lambda m: m.topic == f"{base}/state" and m.retain, "the retained state")
                assert not [m for m in late.since(0) if b"forged" in m.payload]
            finally:
                late.close()
        finally:
            for c in (inside, spy, forger):
                c.close()
    assert cluster.procs == {}


def test_add_user_needs_a_password_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nsync_mqtt", "broker", "--add-user", "alice"],
        input="pw\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "password_file" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["node", "--id", "solo", "--peers", "solo", "--embed-broker", "0.0.0.0:{port}"],
        ["broker", "--listen", "0.0.0.0:{port}"],
    ],
    ids=["node", "broker"],
)
def test_a_broker_open_to_the_network_needs_a_password_file(
    tmp_path: Path, args: list[str]
) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "nsync_mqtt", *(a.format(port=port) for a in args)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "open to the whole network" in result.stderr and "--add-user" in result.stderr
