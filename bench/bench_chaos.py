"""Chaos, long profile: a five-node cluster (two Mosquitto brokers in its list, each node behind
its own fault proxy to the first) under many seeded faults while a client keeps enqueueing,
playing, pausing and skipping.

    .venv/bin/python bench/bench_chaos.py --faults 200 --seed 1

Prints the fault kinds injected, each invariant's checks and violations, and the election
times (fault on the master or its broker -> first successful client command), then writes
bench/results/chaos.json (or the file named by --out). A run with a violation prints the seed
and the fault schedule that reproduce it and exits 1. The short profile is tests/chaos (same
harness, nsync_lab.chaos).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common
from common import summary_ms, table

from nsync_lab.chaos import INVARIANTS, KINDS, ChaosConfig, FaultRecord, run_chaos


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=200, help="faults to inject (default 200)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule (default 1)")
    p.add_argument("--keep", type=Path, help="keep the run's logs in this directory")
    p.add_argument(
        "--out", default="chaos.json", help="result file in bench/results (default chaos.json)"
    )
    p.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated fault kinds to draw from (default all: {','.join(KINDS)})",
    )
    args = p.parse_args()
    drawn = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in drawn if k not in KINDS]
    if unknown or not drawn:
        p.error(f"unknown fault kind(s) {','.join(unknown)!r}; choose from {','.join(KINDS)}")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwind through the harness's cleanup: no process left behind

    signal.signal(signal.SIGTERM, terminate)

    def progress(rec: FaultRecord) -> None:
        outage = f" outage {rec.outage_s:.2f} s" if rec.outage_s is not None else ""
        print(
            f"#{rec.index} {rec.fault} on {','.join(rec.nodes) or 'the first broker'} "
            f"(master {rec.master_before}){outage}, ready {rec.t_ready - rec.t_heal:.1f} s "
            f"after healing" + (f" [{'; '.join(rec.notes)}]" if rec.notes else ""),
            flush=True,
        )

    before = common.conditions()
    with tempfile.TemporaryDirectory(prefix="nsync-chaos-") as tmp:
        workdir = args.keep or Path(tmp)
        result = run_chaos(ChaosConfig(args.seed, args.faults, workdir, kinds=drawn), progress)
    after = common.conditions()

    print()
    print(result.report())
    kinds = Counter(r.fault.kind for r in result.records)
    print()
    print(table(["fault", "injected", "hit the master"], [
        [k, kinds[k], sum(1 for r in result.records if r.fault.kind == k and r.hit_master)]
        for k in KINDS
    ]))  # fmt: skip
    print()
    print(table(["invariant", "checks", "violations"], [
        [k, result.checked[k], len(result.violations[k])] for k in INVARIANTS
    ]))  # fmt: skip
    elections = summary_ms(result.election_times_s())
    by_kind: dict[str, Any] = {
        k: summary_ms([r.outage_s for r in result.records if r.fault.kind == k and r.outage_s])
        for k in KINDS
        if any(r.fault.kind == k and r.outage_s for r in result.records)
    }
    print()
    print(table(["master hit by", "n", "p50 ms", "p99 ms", "max ms"], [
        [k, s["n"], s["p50_ms"], s["p99_ms"], s["max_ms"]]
        for k, s in [*by_kind.items(), ("all", elections)]
    ]))  # fmt: skip
    skews = summary_ms([x / 1e3 for x in result.rejoin_skews_ms])
    print(f"rejoin skew: p50 {skews['p50_ms']:.3f} ms, max {skews['max_ms']:.3f} ms")
    print(f"machine load before {before}, after {after}")

    doc = {
        "bench": "chaos",
        "command": ".venv/bin/python bench/bench_chaos.py "
        f"--faults {args.faults} --seed {args.seed}"
        + (f" --kinds {','.join(drawn)}" if drawn != KINDS else "")
        + (f" --out {args.out}" if args.out != "chaos.json" else ""),
        "date": common.now_iso(),
        "machine": common.machine(),
        "conditions": {"before": before, "after": after},
        "fault_kinds": dict(kinds),
        "election_ms": {"all": elections, **by_kind},
        "rejoin_skew_ms": skews,
        **result.to_dict(),
    }
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / Path(args.out).name
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(doc, indent=2) + "\n")
    tmp_path.replace(path)
    print(f"wrote {path} in {time.strftime('%H:%M:%S')}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
