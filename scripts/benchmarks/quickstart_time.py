#!/usr/bin/env python
"""How long the quickstart takes, quiet and beside busy processes: prints a table of median wall times.

    python scripts/benchmarks/quickstart_time.py                 # quiet, and beside two busy processes
    python scripts/benchmarks/quickstart_time.py --repeats 3 --busy 2

Each run is `python scripts/train.py configs/quickstart.yaml` in a fresh process, offline, as a user starts it
(OMP_NUM_THREADS unset, so the script picks its own thread count), into a temporary folder. "busy" starts that
many processes that spin on the CPU for the whole run, as other jobs on a shared machine do. With
`--old_default`, a row "busy, OMP_NUM_THREADS=<cores>" shows what the script did before it chose its threads: one
OpenMP thread per core, fighting the busy processes. Wall times depend on the machine and what else runs: compare
the rows of one invocation.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def spin(seconds: float) -> None:
    """Keep one core busy for at most `seconds` (ends by itself)."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


def quickstart_seconds(omp: str | None) -> float:
    """The wall time of one quickstart run (it must succeed)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["HF_HUB_OFFLINE"] = "1"
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(REPO / "scripts" / "train.py"), str(REPO / "configs" / "quickstart.yaml"),
                   "--output_dir", out]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True)
        return time.perf_counter() - start


def measure(busy: int, repeats: int, omp: str | None, limit: float) -> list[float]:
    spinners = [multiprocessing.Process(target=spin, args=(limit,), daemon=True) for _ in range(busy)]
    for process in spinners:
        process.start()
    try:
        return [quickstart_seconds(omp) for _ in range(repeats)]
    finally:
        for process in spinners:
            process.terminate()
            process.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs per condition (the table gives the median)")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the run in the busy rows")
    parser.add_argument("--limit", type=float, default=1800.0, help="seconds after which a busy process stops anyway")
    parser.add_argument("--old_default", action="store_true",
                        help="also the busy row with one OpenMP thread per core (slow: minutes on 2 cores)")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows = [("quiet", 0, None), (f"{args.busy} busy processes", args.busy, None)]
    if args.old_default:
        rows.append((f"{args.busy} busy processes, OMP_NUM_THREADS={cores}", args.busy, str(cores)))
    print(f"quickstart wall time, {cores} cores, {args.repeats} run(s) per row (median)")
    print("| condition | median s | runs (s) |")
    print("|---|---|---|")
    for label, busy, omp in rows:
        times = measure(busy, args.repeats, omp, args.limit)
        print(f"| {label} | {statistics.median(times):.0f} | {', '.join(f'{t:.0f}' for t in times)} |", flush=True)


if __name__ == "__main__":
    main()
