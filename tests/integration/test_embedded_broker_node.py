"""A node that runs the embedded broker itself, protected by a password file made with
`nsync broker --add-user`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nsync_lab.testing import NodeCluster, NodeSpec, free_port
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
    pw = tmp_path / "passwords"
    assert add_user(pw, "alice", "s3cret").returncode == 0
    assert add_user(pw, "bob", "other").returncode == 0
    assert add_user(pw, "alice", "n3w-s3cret").returncode == 0  # replaces alice's line
    lines = pw.read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["bob", "alice"]
    assert "s3cret" not in pw.read_text()

    port = free_port()
    spec = NodeSpec(
        "solo",
        extra=["--embed-broker", f"127.0.0.1:{port}", "--embed-broker-password-file", str(pw)],
    )
    cluster = NodeCluster(f"mqtt://alice:n3w-s3cret@127.0.0.1:{port}", tmp_path / "c", [spec])
    with cluster:
        cluster.wait_ready(calibrated=False)
        with NSyncClient(f"mqtt://bob:other@127.0.0.1:{port}") as client:
            reply = client.status()
            assert reply["success"], reply
            assert reply["state"]["master"] == "solo"
        with pytest.raises(BrokerError, match="refused"):
            NSyncClient(f"mqtt://alice:s3cret@127.0.0.1:{port}", timeout=2).connect()
        with pytest.raises(BrokerError, match="refused"):
            NSyncClient(f"mqtt://127.0.0.1:{port}", timeout=2).connect()
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
