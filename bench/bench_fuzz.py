"""The long profile of the property-based fuzz (nsync_lab.fuzz, hypothesis): junk on every topic a
node subscribes to, through the cluster simulator and against a live signed 3-node cluster.

    .venv/bin/python bench/bench_fuzz.py                         # 100,000 simulated, 10,000 live
    .venv/bin/python bench/bench_fuzz.py --sim-inputs 2000 --live-inputs 500   # a quick look
    .venv/bin/python bench/bench_fuzz.py --broker mosquitto

The simulator part runs half its inputs against signed clusters and half against clusters
without a key (where well-formed forgeries are left out: only a key stops them), in two
processes; a fresh simulated cluster every 20,000 inputs, or after any problem. The live part
feeds a signed cluster on ``--broker`` (the embedded amqtt broker by default) in rounds of
``--live-round`` inputs and checks after each: the same master in the same term, state files,
playlist and song store unchanged, every command with a reply_to refused with a message, the
nodes alive with nothing but refused input in their fault counts; and at the end a real command
still succeeds.

Prints the figures and writes bench/results/fuzz-<broker>.json (inputs tried, crashes,
unintended state changes, bad replies, skipped forgeries, time, inputs by kind, the machine).
Exits 1 if anything broke.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import arg_parser, broker, conditions, record, table

from nsync_lab.fuzz import Tally, batches, flatten, fuzz_sim, live_fuzzer, sample
from nsync_lab.testing import NodeCluster

assert common.REPO  # run from anywhere: common puts the repository on sys.path


def sim_part(args: tuple[int, int, bool]) -> dict[str, Any]:
    inputs, seed, signed = args
    logging.disable(logging.CRITICAL)
    t0 = time.perf_counter()
    name = "signed" if signed else "unsigned"

    def progress(t: Tally) -> None:
        print(f"  sim {name}: {t.inputs} inputs, {len(t.problems)} problems", flush=True)

    tally = fuzz_sim(inputs, seed=seed, signed=signed, progress=progress)
    return {"cluster": name, **tally.as_dict(), "wall_s": round(time.perf_counter() - t0, 1)}


def run_sim(inputs: int, seed: int, jobs: int) -> dict[str, Any]:
    work = [(inputs - inputs // 2, seed, True), (inputs // 2, seed + 1, False)]
    t0 = time.perf_counter()
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(min(jobs, 2)) as pool:
            parts = pool.map(sim_part, work)
    else:
        parts = [sim_part(w) for w in work]
    return {"parts": parts, **totals(parts), "wall_s": round(time.perf_counter() - t0, 1)}


def totals(parts: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("inputs", "skipped", "replies_checked", "crashes", "state_changes", "bad_replies")
    return {k: sum(p[k] for p in parts) for k in keys}


def run_live(kind: str, inputs: int, round_: int, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, broker(kind, Path(tmp)) as b:
        cluster = NodeCluster.of(
            b.url,
            Path(tmp) / "c",
            3,
            cluster="fuzz",
            signed=True,
            settings={"max_song_mb": 2, "max_song_minutes": 1},
        )
        cluster.start()
        try:
            cluster.wait_ready()
            strict = kind == "mosquitto"
            with live_fuzzer(cluster, Path(tmp), strict) as (fz, client, _raw):
                n = 0
                while fz.tally.inputs < inputs:
                    n += 1
                    want = min(round_, inputs - fz.tally.inputs)
                    drawn = sample(batches(fz.ctx, 30), max(1, want // 22), seed * 1000 + n)
                    t1 = time.perf_counter()
                    fz.feed(flatten(x for batch in drawn for x in batch))
                    problems = fz.finish()
                    rounds.append(
                        {
                            "round": n,
                            "inputs": fz.tally.inputs,
                            "problems": len(problems),
                            "s": round(time.perf_counter() - t1, 1),
                        }
                    )
                    print(
                        f"  live: {fz.tally.inputs} inputs, {len(fz.tally.problems)} problems",
                        flush=True,
                    )
                    for p in problems:
                        print(f"    {p}", flush=True)
                    if not cluster.alive():
                        break
                rejected = fz.rejected()
                still = client.volume(38).get("success") is True
                still = still and client.volume(37).get("success") is True
        finally:
            codes = cluster.stop()
    result = fz.tally.as_dict()
    result.update(
        {
            "broker": b.version(),
            "rounds": len(rounds),
            "rejected_by_nodes": rejected,
            "real_command_after": still,
            "clean_exit": all(c == 0 for c in codes.values()),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    )
    return result


def main() -> None:
    ap = arg_parser(__doc__ or "")
    ap.add_argument("--sim-inputs", type=int, default=100_000)
    ap.add_argument("--live-inputs", type=int, default=10_000)
    ap.add_argument("--live-round", type=int, default=1000, help="live inputs between checks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="processes for the simulator part")
    args = ap.parse_args()
    before = conditions()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"seed": args.seed}
    if args.sim_inputs > 0:
        print(f"simulator: {args.sim_inputs} inputs", flush=True)
        result["sim"] = run_sim(args.sim_inputs, args.seed, args.jobs)
    if args.live_inputs > 0:
        print(f"live ({args.broker}): {args.live_inputs} inputs", flush=True)
        result["live"] = run_live(args.broker, args.live_inputs, args.live_round, args.seed)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    rows = []
    for part in ("sim", "live"):
        r = result.get(part)
        if r:
            rows.append(
                [
                    part,
                    r["inputs"],
                    r["crashes"],
                    r["state_changes"],
                    r["bad_replies"],
                    r["replies_checked"],
                    r["skipped"],
                    r["wall_s"],
                ]
            )
    headers = ["part", "inputs", "crashes", "state changes", "bad replies", "replies", "skipped"]
    print(table([*headers, "s"], rows))
    problems = [p for part in ("sim", "live") for p in _problems(result.get(part))]
    for p in problems[:20]:
        print(p)
    live = result.get("live")
    broken = bool(problems) or (
        live is not None and not (live["real_command_after"] and live["clean_exit"])
    )
    path = record("fuzz", args.broker, before, result)
    print(f"wrote {path}")
    print(json.dumps({"broken": broken}))
    sys.exit(1 if broken else 0)


def _problems(part: dict[str, Any] | None) -> list[str]:
    if not part:
        return []
    if "parts" in part:
        return [p for sub in part["parts"] for p in sub["problems"]]
    return list(part["problems"])


if __name__ == "__main__":
    main()
