"""Run the cluster simulator over seeds.

    python -m nsync_lab.sim.run --seed 17                    # one seed, replayed exactly
    python -m nsync_lab.sim.run --seeds 0:500 --jobs 2       # the CI profile
    python -m nsync_lab.sim.run --seeds 0:100000 --jobs 2 --keep-going  # the long profile
    python -m nsync_lab.sim.run --seed 3 --profile long-seed       # 5 nodes, 10 min, 100 faults

Profile ``ci``: a simulated minute per seed, 10 faults healed by the last 15 s, three nodes
for even seeds and five for odd ones.

A failing seed prints the one command that replays it and writes a readable trace (the last
events of every node, the broker and the faults) to ``--trace-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cluster import Simulation, Violation

# (nodes, simulated seconds, faults, settle seconds); nodes 0 = 3 for even seeds, 5 for odd
PROFILES: dict[str, tuple[int, float, int, float]] = {
    "ci": (0, 60.0, 10, 15.0),
    "five": (5, 60.0, 10, 15.0),
    "long-seed": (5, 600.0, 100, 30.0),
    "edits": (0, 60.0, 10, 15.0),  # the ci profile's faults; the workload also edits
    "unsigned": (0, 60.0, 10, 15.0),  # the ci profile on a cluster without a key
}
EDIT_PROFILES = frozenset({"edits"})
UNSIGNED_PROFILES = frozenset({"unsigned"})  # the others sign every internal message


def nodes_for(profile: str, seed: int) -> int:
    nodes = PROFILES[profile][0]
    return nodes or (3 if seed % 2 == 0 else 5)


@dataclass
class Outcome:
    seed: int
    ok: bool
    error: str
    stats: dict[str, Any]
    trace: list[str]


def run_seed(seed: int, profile: str = "ci") -> Outcome:
    _, duration, faults, settle = PROFILES[profile]
    nodes = nodes_for(profile, seed)
    sim = Simulation(
        seed,
        nodes=nodes,
        duration_s=duration,
        faults=faults,
        settle_s=settle,
        edits=profile in EDIT_PROFILES,
        signed=profile not in UNSIGNED_PROFILES,
    )
    try:
        res = sim.run()
    except Violation as err:
        return Outcome(seed, False, str(err), {}, _trace(sim))
    except Exception as err:  # a crash of the code under test is a failure too
        tb = traceback.format_exception(err)
        return Outcome(seed, False, f"{type(err).__name__}: {err}", {}, _trace(sim) + tb)
    stats = {
        "sim_s": res.sim_s,
        "faults": res.faults,
        "events": res.events,
        "commands": res.commands,
        "acked_enqueues": res.acked_enqueues,
        "terms": res.terms,
        "checks": res.checks,
    }
    return Outcome(seed, True, "", stats, [])


def _trace(sim: Simulation) -> list[str]:
    lines = [f"# seed {sim.seed}: fault plan"]
    lines += [f"#   {f.describe() if hasattr(f, 'describe') else f}" for f in sim.plan]
    return lines + sim.world.trace.lines()


def _run_one(args: tuple[int, str]) -> Outcome:
    logging.disable(logging.CRITICAL)
    return run_seed(*args)


def run_seeds(
    seeds: Iterable[int], profile: str = "ci", jobs: int = 1, stop_at_first: bool = True
) -> tuple[list[Outcome], dict[str, Any]]:
    t0 = time.perf_counter()
    work = [(s, profile) for s in seeds]
    failures: list[Outcome] = []
    totals: dict[str, Any] = {"seeds": 0, "sim_s": 0.0, "faults": 0, "events": 0, "commands": 0}
    totals.update({"acked_enqueues": 0, "checks": 0})

    def take(o: Outcome) -> bool:
        totals["seeds"] += 1
        for k, v in o.stats.items():
            if k in totals:
                totals[k] += v
        if not o.ok:
            failures.append(o)
            return stop_at_first
        return False

    if jobs <= 1:
        logging.disable(logging.CRITICAL)
        for w in work:
            if take(run_seed(*w)):
                break
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs) as pool:
            for o in pool.imap(_run_one, work, chunksize=4):
                if take(o):
                    pool.terminate()
                    break
    totals["wall_s"] = round(time.perf_counter() - t0, 2)
    return failures, totals


def replay_command(seed: int, profile: str) -> str:
    return f"python -m nsync_lab.sim.run --seed {seed} --profile {profile}"


def report_failure(o: Outcome, profile: str, trace_dir: Path) -> str:
    trace_dir.mkdir(parents=True, exist_ok=True)
    path = trace_dir / f"sim-seed-{o.seed}.txt"
    path.write_text("\n".join(o.trace) + "\n")
    return (
        f"seed {o.seed} broke an invariant: {o.error}\n"
        f"  replay: {replay_command(o.seed, profile)}\n"
        f"  trace:  {path}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, help="run one seed")
    ap.add_argument("--seeds", default="0:500", help="a range FROM:TO of seeds (default 0:500)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="ci")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first failure")
    ap.add_argument("--trace-dir", type=Path, default=Path("sim-traces"))
    ap.add_argument("--json", type=Path, help="write the totals here")
    args = ap.parse_args(argv)
    if args.seed is not None:
        seeds: Iterable[int] = [args.seed]
    else:
        lo, hi = (int(x) for x in args.seeds.split(":"))
        seeds = range(lo, hi)
    failures, totals = run_seeds(seeds, args.profile, args.jobs, not args.keep_going)
    totals["failures"] = [f.seed for f in failures]
    print(json.dumps(totals))
    for o in failures:
        print(report_failure(o, args.profile, args.trace_dir), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(totals, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
