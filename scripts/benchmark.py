#!/usr/bin/env python
"""Benchmark GR's cost: a GR optimizer step against a plain Trainer step (the 2× floor) and a peer SAM.

    python scripts/benchmark.py                      # ViT-Ti (paper CIFAR config), batch 24, 1 thread
    python scripts/benchmark.py --quick --json out.json

Times, interleaved in one process (one step of each configuration per round, order rotating, warm-up rounds
discarded, torch threads fixed), one full optimizer step of: a plain `Trainer`, `GRTrainer` finite-difference
GR at α = 0.5 and α = 1, `GRTrainer` inside the zero-warmup phase, `gr_method="exact"`, the peer
`pytorch_optimizer.SAM` around AdamW, and plain/GR with gradient accumulation 2. First runs each
configuration in its own (forked) subprocess for memory: the live tensor bytes at GR's bookkeeping points (GR's
extra buffers over the parameter bytes) and peak RSS as a cross-check. Prints a table; `--json PATH` writes
every number as flat keys.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import sys
import time
from typing import Any

import torch

import benchmarking as bench

TARGETS = {  # key: (limit, what it is measured against)
    "gr_over_plain": (2.05, "floor 2.0"),
    "zero_over_plain": (1.02, "floor 1.0"),
    "gr_over_peer_sam": (1.0, "peer"),
    "extra_bytes_over_param_bytes": (1.05, "floor 1.0"),
    "extra_bytes_over_param_bytes_ga": (2.05, "floor 2.0"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller ViT and batch (finishes in < 2 min)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up rounds discarded")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared CPU, oversubscribed OpenMP threads swing steps 10-100x)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="override the micro-batch size")
    parser.add_argument("--configs", default=",".join(bench.CONFIGS), help="comma-separated configurations")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    parser.add_argument("--json", default=None, help="write all numbers as flat keys to this path")
    return parser.parse_args(argv)


def model_spec(args: argparse.Namespace) -> bench.ModelSpec:
    spec = bench.VIT_QUICK if args.quick else bench.VIT_TI
    if args.batch_size is not None:
        spec = bench.ModelSpec(**{**spec.__dict__, "batch_size": args.batch_size})
    return spec


def _memory_child(name: str, spec: bench.ModelSpec, connection: Any) -> None:
    try:  # glibc: serve tensors >= 64 KiB by mmap and trim at once, so peak RSS follows the live peak
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the peak-RSS mark inherited from the parent (Linux >= 4.0)
    except OSError:
        pass
    connection.send(bench.measure_memory(name, spec))
    connection.close()


def measure_memory_in_subprocesses(spec: bench.ModelSpec, names: list[str]) -> dict[str, dict[str, float]]:
    """One forked process per configuration, so that its peak RSS is its own (run before any model is built)."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    memory = {}
    for name in names:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_memory_child, args=(name, spec, sender))
        process.start()
        sender.close()
        try:
            memory[name] = receiver.recv()
        except EOFError:
            print(f"memory run of {name} failed (exit code {process.exitcode})", file=sys.stderr)
        process.join()
        print(f"memory: {name} done", file=sys.stderr, flush=True)
    return memory


def format_table(results: dict[str, Any], names: list[str]) -> str:
    lines = [
        f"model {results['model']}, batch {results['batch_size']}, params {results['param_count']:,}, "
        f"torch {results['torch_version']}, {results['torch_threads']} threads, {results['cpu_count']} cores, "
        f"{results['measured_steps']} steps (+{results['warmup_steps']} warm-up), interleaved",
        "",
        f"{'configuration':<12} {'median s':>9} {'min s':>8} {'max s':>8} {'× plain':>8} "
        f"{'extra/param: bookkeeping':>24} {'at pass':>8} {'peak RSS':>9}",
    ]
    for name in names:
        if f"{name}_median_s" not in results:
            continue
        baseline = "plain_ga2" if bench.CONFIGS[name].accumulation == 2 else "plain"
        over = results[f"{name}_median_s"] / results[f"{baseline}_median_s"]
        if name == "gr_ga2":
            live = results.get("extra_bytes_over_param_bytes_ga")
            at_pass = results.get("extra_bytes_over_param_bytes_ga_at_pass")
            rss = results.get("extra_bytes_over_param_bytes_ga_rss")
        else:
            live = results.get(f"{name}_extra_bytes_over_param_bytes")
            at_pass = results.get(f"{name}_extra_bytes_over_param_bytes_at_pass")
            rss = results.get(f"{name}_extra_bytes_over_param_bytes_rss")
        lines.append(
            f"{name:<12} {results[f'{name}_median_s']:>9.3f} {results[f'{name}_min_s']:>8.3f} "
            f"{results[f'{name}_max_s']:>8.3f} {over:>8.3f} {_fmt(live):>24} {_fmt(at_pass):>8} {_fmt(rss):>9}"
        )
    lines += ["", "ratio (median of per-round ratios) of medians   target   met"]
    for key in (
        "gr_over_plain",
        "gr_a0.5_over_plain",
        "gr_a1_over_plain",
        "zero_over_plain",
        "exact_over_plain",
        "gr_over_peer_sam",
        "gr_ga2_over_plain_ga2",
        "extra_bytes_over_param_bytes",
        "extra_bytes_over_param_bytes_ga",
        "extra_bytes_over_param_bytes_at_pass",
        "extra_bytes_over_param_bytes_ga_at_pass",
        "extra_bytes_over_param_bytes_rss",
        "extra_bytes_over_param_bytes_ga_rss",
    ):
        if key not in results:
            continue
        limit = TARGETS.get(key, (None, ""))[0]
        met = "" if limit is None else ("yes" if results[key] <= limit else "NO")
        of_medians = results.get(f"{key}_of_medians")
        lines.append(f"{key:<34} {results[key]:>7.3f} {_fmt(of_medians):>10} {_fmt(limit):>8}   {met}")
    for name in ("gr_a0.5", "gr_a1", "gr_ga2"):
        if f"{name}_overhead_fraction" not in results:
            continue
        parts = ", ".join(
            f"{part.rstrip('_')} {results[f'{name}_{part}_median_s'] * 1e3:.1f}"
            for part in bench.BOOKKEEPING_FUNCTIONS
        )
        lines.append(
            f"overhead {name}: {results[f'{name}_overhead_fraction']:.2%} of the step outside the passes "
            f"({results[f'{name}_bookkeeping_median_s'] * 1e3:.1f} ms: {parts} ms; "
            f"passes {results[f'{name}_pass_median_s'] * 1e3:.0f} ms, "
            f"optimizer/clip {results[f'{name}_optimizer_and_rest_median_s'] * 1e3:.0f} ms)"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = model_spec(args)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(bench.CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {', '.join(bench.CONFIGS)}")
    steps = args.steps if args.steps is not None else (10 if args.quick else 8)
    started = time.perf_counter()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    memory = {} if args.no_memory else measure_memory_in_subprocesses(spec, names)
    timings = bench.time_configs(names, spec, steps=steps, warmup=args.warmup, log=log)
    results: dict[str, Any] = {
        "model": spec.name,
        "batch_size": spec.batch_size,
        "param_count": sum(p.numel() for p in bench.make_model(spec).parameters()),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "measured_steps": steps,
        "warmup_steps": args.warmup,
        **bench.summarize(timings, memory),
    }
    results["wall_s"] = time.perf_counter() - started
    print(format_table(results, names))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    return results


if __name__ == "__main__":
    main()
