"""`nsync demo` end to end: a 3-node cluster comes up, plays in sync, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

DEMO_TIMEOUT_S = 60.0
TEMP_DIR_RE = re.compile(r"logs in (\S+)")
SKEW_RE = re.compile(r"skew between nodes[^\n]*?(\d+\.\d{3}) ms")
MASTER_RE = re.compile(r"master: (n\d+) \(term \d+\)")


def _processes() -> list[tuple[int, int, list[str]]]:
    """(pid, parent pid, argv) of every process visible in /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out.append((int(entry.name), int(fields[1]), [a for a in argv if a]))
    return out


def _leftover_nodes(demo_pid: int, temp_dir: str | None) -> list[str]:
    """Node processes started by the demo that are still around."""
    left = []
    for pid, ppid, argv in _processes():
        line = " ".join(argv)
        is_node = "nsync_mqtt" in line and "node" in argv
        if pid != demo_pid and (
            ppid == demo_pid or (is_node and temp_dir is not None and temp_dir in line)
        ):
            left.append(f"{pid}: {line}")
    return left


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_demo(out: Path, *args: str, sigint_ignored: bool = False) -> subprocess.Popen[bytes]:
    """Start ``nsync demo``; with ``sigint_ignored``, as a shell starts a background job of a
    script (SIGINT ignored on entry)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with out.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "nsync_mqtt", "demo", *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_ignore_sigint if sigint_ignored else None,
        )


def _finish(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"nsync demo still running after {timeout_s:g} s")


def _temp_dir(text: str) -> str | None:
    m = TEMP_DIR_RE.search(text)
    return m.group(1) if m else None


def test_demo_runs_a_cluster_in_sync_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    proc = _start_demo(out, "--seconds", "8")
    try:
        code = _finish(proc, DEMO_TIMEOUT_S)
        text = out.read_text(errors="replace")
        assert code == 0, text
        assert MASTER_RE.search(text), text
        skews = [float(s) for s in SKEW_RE.findall(text)]
        assert skews, f"no skew figure in the demo output:\n{text}"
        assert "summary: max skew seen" in text, text
        assert "load x3" in text and "play x1" in text, text
        temp_dir = _temp_dir(text)
        assert temp_dir is not None, text
        assert not Path(temp_dir).exists(), f"demo left {temp_dir} behind"
        assert _leftover_nodes(proc.pid, temp_dir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_demo_ends_cleanly_on_ctrl_c(tmp_path: Path, sigint_ignored: bool) -> None:
    out = tmp_path / "demo.out"
    proc = _start_demo(out, sigint_ignored=sigint_ignored)
    try:
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        while _temp_dir(out.read_text(errors="replace")) is None:
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, "the demo never said where its logs are"
            time.sleep(0.05)
        temp_dir = _temp_dir(out.read_text(errors="replace"))
        time.sleep(6.0)
        assert proc.poll() is None, out.read_text(errors="replace")
        nodes = [p for p in _processes() if p[1] == proc.pid and "node" in p[2]]
        assert len(nodes) == 3, nodes
        proc.send_signal(signal.SIGINT)
        code = _finish(proc, 15.0)
        text = out.read_text(errors="replace")
        assert code in (0, 130), text
        assert "summary:" in text, text
        assert temp_dir is not None and not Path(temp_dir).exists()
        assert _leftover_nodes(proc.pid, temp_dir) == []
        for pid, _, _ in nodes:
            assert not Path(f"/proc/{pid}").exists(), f"node {pid} survived the demo"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_fails_loudly_when_a_node_dies(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    proc = _start_demo(out)
    try:
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        while "loaded and enqueued Demo C" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, "the demo never loaded its songs"
            time.sleep(0.05)
        temp_dir = _temp_dir(out.read_text(errors="replace"))
        victims = [p for p in _processes() if p[1] == proc.pid and "n3" in p[2]]
        assert len(victims) == 1, victims
        os.kill(victims[0][0], signal.SIGKILL)  # a node of the demo this test started
        code = _finish(proc, 20.0)
        text = out.read_text(errors="replace")
        assert code == 1, text
        assert "node n3 (exit -9) died; its log ends:" in text, text
        assert "--- n3 (" in text, text
        assert "the demo FAILED" in text, text
        assert temp_dir is not None and not Path(temp_dir).exists()
        assert _leftover_nodes(proc.pid, temp_dir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
