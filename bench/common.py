"""Shared helpers of the NSync benchmarks: a broker process on loopback, percentiles, tables,
machine facts and the JSON result files in bench/results/.

Every process a benchmark uses is started here or by ``nsync_lab.testing.NodeCluster`` and is
stopped by its own handle; everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BROKERS = ("amqtt", "mosquitto")

for _path in (REPO, REPO / "lab"):  # run as `python bench/bench_X.py` from anywhere
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from nsync_lab import testing  # noqa: E402
from nsync_lab.testing import MOSQUITTO, free_port  # noqa: E402


class BrokerProcess(testing.BrokerProcess):
    """The shared broker process on a free loopback port, which can report its version."""

    def __init__(self, kind: str, workdir: Path) -> None:
        super().__init__(kind, free_port(), workdir)

    def version(self) -> str:
        if self.kind == "amqtt":
            return f"amqtt {metadata.version('amqtt')}"
        out = subprocess.run([str(MOSQUITTO), "-h"], capture_output=True, text=True, check=False)
        first = (out.stdout or out.stderr).splitlines()
        return first[0].strip() if first else "mosquitto"


@contextlib.contextmanager
def broker(kind: str, workdir: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(kind, workdir).start()
    try:
        yield b
    finally:
        b.stop()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    """p50/p99/mean/min/max of durations given in seconds, in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(sum(ms) / len(ms), 3) if ms else math.nan,
        "min_ms": round(min(ms), 3) if ms else math.nan,
        "max_ms": round(max(ms), 3) if ms else math.nan,
    }


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    debian = ""
    with contextlib.suppress(OSError):
        debian = Path("/etc/debian_version").read_text().strip()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "os": f"Debian {debian}" if debian else platform.system(),
        "kernel": platform.release(),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "paho_mqtt": metadata.version("paho-mqtt"),
        "network": "loopback (127.0.0.1)",
    }


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all cores busy over ``seconds`` (from /proc/stat): other work on the machine."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return math.nan
    total = total1 - total0
    return round(1.0 - (idle1 - idle0) / total, 3) if total > 0 else math.nan


def conditions() -> dict[str, Any]:
    """How busy the machine is right now (a shared VM: other work skews the numbers)."""
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "cpu_busy_1s": cpu_busy()}


def write_result(name: str, broker_kind: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{broker_kind}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table, fit to print and to paste into docs."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in text
    ]
    return "\n".join([line, rule, *body])


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--broker", choices=BROKERS, default="amqtt", help="broker to run against")
    return p


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_png(path: Path, width: int, height: int, colour_type: int, rows: bytes) -> None:
    """A PNG file of 8-bit ``rows`` (each led by its filter byte); no imaging library."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def write_png(path: Path, width: int, height: int, dark: set[tuple[int, int]]) -> None:
    """A black-on-white PNG (8-bit grey) with the pixels in `dark` set."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        rows.extend(0 if (x, y) in dark else 255 for x in range(width))
    _write_png(path, width, height, 0, bytes(rows))


def write_png_rgb(
    path: Path, width: int, height: int, pixels: dict[tuple[int, int], tuple[int, int, int]]
) -> None:
    """A PNG (8-bit RGB) on white with the given pixels coloured."""
    rows = bytearray()
    white = (255, 255, 255)
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows.extend(pixels.get((x, y), white))
    _write_png(path, width, height, 2, bytes(rows))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def step_plot_png(
    path: Path, spans: Sequence[tuple[float, float]], t_end: float, width: int = 900
) -> None:
    """Reachable master 1/0 over time as a PNG: a step line dropping to 0 during each span,
    with a time axis ticked every 10 s."""
    height, pad = 140, 20
    y1, y0 = pad, height - pad
    scale = (width - 2 * pad) / max(t_end, 1e-9)
    dark: set[tuple[int, int]] = set()

    def line(xa: int, ya: int, xb: int, yb: int) -> None:
        for x in range(min(xa, xb), max(xa, xb) + 1):
            for y in range(min(ya, yb), max(ya, yb) + 1):
                dark.add((x, y))

    xs = [pad]
    level = y1
    for a, b in spans:
        xa, xb = pad + int(a * scale), pad + int(b * scale)
        line(xs[-1], level, xa, level)
        line(xa, y1, xa, y0)
        line(xa, y0, xb, y0)
        line(xb, y0, xb, y1)
        xs.append(xb)
    line(xs[-1], y1, width - pad, y1)
    line(pad, y0 + 6, width - pad, y0 + 6)  # time axis
    for t in range(0, int(t_end) + 1, 10):
        x = pad + int(t * scale)
        line(x, y0 + 3, x, y0 + 9)
    write_png(path, width, height, dark)


def record(name: str, broker_kind: str, before: dict[str, Any], result: dict[str, Any]) -> Path:
    """Write a result with the exact command line, the time, the machine and how busy it was
    before and after the run."""
    command = ".venv/bin/python " + " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    doc = {
        "command": command,
        "when": now_iso(),
        "machine": machine(),
        "conditions": {"before": before, "after": conditions()},
        **result,
    }
    return write_result(name, broker_kind, doc)
