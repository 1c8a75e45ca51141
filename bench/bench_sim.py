"""The cluster simulator's speed and its long profile.

    .venv/bin/python bench/bench_sim.py --long-seed 3   # one seed: 5 nodes, 10 min, 100 faults
    .venv/bin/python bench/bench_sim.py --seeds 0:500   # the CI profile, timed
    .venv/bin/python bench/bench_sim.py --seeds 0:1000 --profile edits --out sim-edits.json
    .venv/bin/python bench/bench_sim.py --seeds 0:100000 --out sim-long.json   # the long profile

The long profile runs in chunks of 1,000 seeds, one result file each, so that it can be
spread over several sittings (seeds 1000 and up; 0-999 are the CI profile's):

    for i in $(seq 1 99); do lo=$((i*1000)); hi=$((lo+1000))
        .venv/bin/python bench/bench_sim.py --seeds $lo:$hi --out sim-long/seeds-$lo-$hi.json
    done
    .venv/bin/python bench/bench_sim.py --sum sim-long      # totals of every chunk so far

Writes bench/results/<out> with the totals (seeds, simulated hours, faults, commands,
acknowledged enqueues, invariant checks, wall time) and the failing seeds, each with its replay
command. Seeds run in ``--jobs`` processes (default: every core).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import common

from nsync_lab.sim.run import PROFILES, replay_command, run_seed, run_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", default=None, help="FROM:TO")
    ap.add_argument("--profile", default="ci", choices=sorted(PROFILES), help="for --seeds")
    ap.add_argument("--long-seed", type=int, default=None, help="time one long-seed run")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sum", default=None, help="add up the chunk files in this results folder")
    args = ap.parse_args()
    if args.sum:
        print(json.dumps(add_up(common.RESULTS / args.sum), indent=1))
        return
    logging.disable(logging.CRITICAL)
    doc: dict[str, object] = {
        "machine": common.machine(),
        "when": common.now_iso(),
        "commit": commit(),
    }
    if args.long_seed is not None:
        t0 = time.perf_counter()
        o = run_seed(args.long_seed, "long-seed")
        wall = time.perf_counter() - t0
        nodes, duration, _, _ = PROFILES["long-seed"]
        doc["long_seed"] = {"seed": args.long_seed, "ok": o.ok, "error": o.error, **o.stats}
        doc["long_seed"]["wall_s"] = round(wall, 2)  # type: ignore[index]
        print(
            f"seed {args.long_seed}: {nodes} nodes, {duration / 60:g} simulated minutes, "
            f"{o.stats.get('faults', '?')} faults, {o.stats.get('events', '?')} events: "
            f"{'ok' if o.ok else o.error} in {wall:.2f} s"
        )
    if args.seeds:
        lo, hi = (int(x) for x in args.seeds.split(":"))
        name = args.profile
        failures, totals = run_seeds(range(lo, hi), name, args.jobs, stop_at_first=False)
        totals["simulated_hours"] = round(totals["sim_s"] / 3600, 1)
        totals["failures"] = [
            {"seed": f.seed, "error": f.error, "replay": replay_command(f.seed, name)}
            for f in failures
        ]
        doc["profile"] = {"name": name, "seeds": f"{lo}:{hi}", "jobs": args.jobs, **totals}
        print(json.dumps(doc["profile"], indent=1))
    if args.out:
        path = common.RESULTS / args.out
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")


def commit() -> str:
    """The commit the simulator ran (chunks of a long profile may span several)."""
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def add_up(folder: Path) -> dict[str, object]:
    """Totals over the chunk files of a long profile, and the ranges of seeds they cover."""
    keys = ("seeds", "sim_s", "faults", "events", "commands", "acked_enqueues", "checks")
    totals: dict[str, float] = dict.fromkeys(keys, 0)
    totals["wall_s"] = 0.0
    ranges, failures = [], []
    commits: set[str] = set()
    for path in sorted(folder.glob("seeds-*.json")):
        prof = json.loads(path.read_text())["profile"]
        for k in (*keys, "wall_s"):
            totals[k] += prof[k]
        ranges.append(prof["seeds"])
        commits.add(json.loads(path.read_text()).get("commit", "before commits were recorded"))
        failures += prof["failures"]
    return {
        **totals,
        "simulated_hours": round(totals["sim_s"] / 3600, 1),
        "chunks": ranges,
        "commits": sorted(commits),
        "failures": failures,
    }


if __name__ == "__main__":
    main()
