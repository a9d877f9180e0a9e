#!/usr/bin/env python
"""Benchmark GR's cost: GR and its cheaper modes against a plain Trainer step (the 2× floor) and a peer SAM.

    python scripts/benchmarks/benchmark.py                      # the paper's ViT-Ti for CIFAR, batch 24, 1 thread
    python scripts/benchmarks/benchmark.py --quick --json out.json
    python scripts/benchmarks/benchmark.py --quick --profile gr_reuse4   # where one configuration's time goes
    python scripts/benchmarks/benchmark.py --quick --no-memory --configs plain,peer_sam,gr_ascent25,gr_ascent25_p05

Times, interleaved in one process, whole cycles of consecutive optimizer steps (8 by default: one sample per
configuration per round, the order rotating, warm-up rounds discarded, torch threads fixed) of: a plain `Trainer`,
`GRTrainer` finite-difference GR at α = 0.5 and α = 1, `GRTrainer` inside the zero-warmup phase,
`gr_method="exact"`, the peer `pytorch_optimizer.SAM` around AdamW, plain/GR with gradient accumulation 2, and the
cheaper modes at α = 1: `gr_probability=0.5`, `gr_interval=4`, `gr_interval=4` with `gr_reuse`, sub-batch ascent
`gr_ascent_fraction=0.25` alone and with `gr_probability=0.5`. Ratios are
medians of per-round ratios. First runs each configuration in its own (forked) subprocess for memory: the live
tensor bytes at each pass's start (GR's extra buffers over the parameter bytes) and peak RSS as a cross-check.
Prints a table; `--json PATH` writes every number as flat keys.
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
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the recipe's paper_vit

import benchmarking as bench  # noqa: E402
from paper_vit import PAPER_VIT_CONFIGS  # noqa: E402

TARGETS: Mapping[str, tuple[float, str]] = MappingProxyType(
    {  # key: (limit, what it is measured against)
        "gr_over_plain": (2.05, "floor 2.0"),
        "zero_over_plain": (1.02, "floor 1.0"),
        "gr_over_peer_sam": (1.0, "peer"),
        "gr_p05_over_plain": (1.55, "floor 1.5"),
        "gr_interval4_over_plain": (1.30, "floor 1.25"),
        "gr_reuse4_over_plain": (1.32, "floor 1.25"),
        "gr_p05_over_peer_sam": (0.80, "peer"),
        "gr_ascent25_over_plain": (1.35, "floor 1.25"),
        "gr_ascent25_over_peer_sam": (0.70, "peer"),
        "gr_ascent25_p05_over_plain": (1.20, "floor 1.125"),
        "extra_bytes_over_param_bytes": (1.05, "floor 1.0: θ copy"),
        "extra_bytes_over_param_bytes_ga": (2.05, "floor 2.0"),
        "extra_bytes_over_param_bytes_reuse": (2.05, "floor 2.0: θ copy, u"),
        "gr_previous_over_plain": (1.08, "floor 1.0"),
        "gr_previous_over_peer_sam": (0.55, "peer"),
        "extra_bytes_over_param_bytes_previous": (2.05, "floor 2.0: θ copy, D"),
    }
)
RATIO_ROWS = (
    "gr_over_plain",
    "gr_a0.5_over_plain",
    "gr_a1_over_plain",
    "zero_over_plain",
    "exact_over_plain",
    "gr_over_peer_sam",
    "gr_ga2_over_plain_ga2",
    "peer_sam_over_plain",
    "gr_p05_over_plain",
    "gr_p05_over_plain_at_p",
    "gr_interval4_over_plain",
    "gr_reuse4_over_plain",
    "gr_reuse4_over_gr_interval4",
    "gr_p05_over_peer_sam",
    "gr_p05_over_peer_sam_at_p",
    "gr_ascent25_over_plain",
    "gr_ascent25_over_peer_sam",
    "gr_ascent25_over_gr_a1",
    "gr_ascent25_p05_over_plain",
    "gr_ascent25_p05_over_plain_at_p",
    "gr_previous_over_plain",
    "gr_previous_over_peer_sam",
)
MEMORY_ROWS: Mapping[str, str] = MappingProxyType(
    {  # key: what GR holds beyond the plain step
        "extra_bytes_over_param_bytes": "α = 1: θ copy",
        "extra_bytes_over_param_bytes_a05": "α = 0.5: θ copy, g1",
        "extra_bytes_over_param_bytes_ga": "α = 0.5, accumulation 2: θ copy, g1",
        "extra_bytes_over_param_bytes_reuse": "α = 1, reuse: θ copy, u",
        "extra_bytes_over_param_bytes_previous": "α = 1, previous_step: θ copy, D",
    }
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller ViT and batch (a few minutes)")
    parser.add_argument("--model", default="vit-ti", choices=list(PAPER_VIT_CONFIGS), help="the paper ViT timed")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 6, --quick 10)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds discarded")
    parser.add_argument("--cycle", type=int, default=bench.CYCLE_STEPS, help="optimizer steps per sample")
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
    parser.add_argument("--profile", default=None, metavar="CONFIG", help="print a cProfile of one cycle and exit")
    return parser.parse_args(argv)


def model_spec(args: argparse.Namespace) -> bench.ModelSpec:
    if args.quick:
        spec = bench.VIT_QUICK
    elif args.model == "vit-ti":
        spec = bench.VIT_TI
    else:
        spec = bench.ModelSpec(args.model, bench.VIT_TI.batch_size, base=args.model)
    if args.batch_size is not None:
        spec = bench.ModelSpec(spec.name, args.batch_size, spec.base, spec.overrides)
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


def format_table(results: Mapping[str, Any], names: list[str]) -> str:
    lines = [
        f"model {results['model']}, batch {results['batch_size']}, params {results['param_count']:,}, "
        f"torch {results['torch_version']}, {results['torch_threads']} threads, {results['cpu_count']} cores, "
        f"{results['measured_rounds']} rounds of {results['cycle_steps']} steps "
        f"(+{results['warmup_rounds']} warm-up), interleaved",
        "",
        f"{'configuration':<15} {'s/step':>7} {'min':>7} {'max':>7} {'× base':>7} {'GR frac':>7} "
        f"{'bookkeeping':>11} {'extra/param: pass start':>23} {'points':>7} {'RSS':>7}",
    ]
    for name in names:
        if f"{name}_median_s" not in results:
            continue
        baseline = bench.CONFIGS[name].baseline
        over = results.get(f"{baseline}_median_s")
        over = None if over is None else results[f"{name}_median_s"] / over
        extra = [results.get(f"{name}_extra_bytes_over_param_bytes{s}") for s in bench.MEMORY_MEASURES]
        lines.append(
            f"{name:<15} {results[f'{name}_median_s']:>7.3f} {results[f'{name}_min_s']:>7.3f} "
            f"{results[f'{name}_max_s']:>7.3f} {_fmt(over):>7} {results[f'{name}_gr_fraction']:>7.3f} "
            f"{results[f'{name}_overhead_fraction']:>11.2%} {_fmt(extra[0]):>23} {_fmt(extra[1]):>7} "
            f"{_fmt(extra[2]):>7}"
        )
    lines += [
        "",
        "(s/step: median over rounds of cycle seconds / steps; × base: of medians, over plain or plain_ga2;",
        " GR frac: realized GR steps / measured steps; bookkeeping: share of the step outside the passes)",
        "",
        f"{'ratio (median of per-round ratios)':<36} {'value':>7} {'of medians':>10} {'target':>7}  met",
    ]
    for key in RATIO_ROWS:
        if key in results:
            lines.append(_target_line(results, key, results.get(f"{key}_of_medians")))
    if "gr_p05_gr_fraction" in results:
        lines.append(f"{'gr_p05_gr_fraction (realized)':<36} {results['gr_p05_gr_fraction']:>7.3f}")
    lines += [
        "",
        f"{'memory (extra / param bytes)':<36} {'pass start':>10} {'points':>7} {'RSS':>7} {'target':>7}  met",
    ]
    for key, held in MEMORY_ROWS.items():
        if key not in results:
            continue
        limit = TARGETS.get(key, (None, ""))[0]
        met = "" if limit is None else ("yes" if results[key] <= limit else "NO")
        lines.append(
            f"{key:<36} {results[key]:>10.3f} {_fmt(results.get(key + '_points')):>7} "
            f"{_fmt(results.get(key + '_rss')):>7} {_fmt(limit):>7}  {met:<3} ({held})"
        )
    for name in names:
        if bench.CONFIGS[name].kind == "gr" and f"{name}_pass_median_s" in results:
            lines.append(
                f"split {name}: passes {results[f'{name}_pass_median_s'] * 1e3:.1f} ms/step "
                f"({results[f'{name}_passes_per_step']:.2f} per step), bookkeeping "
                f"{results[f'{name}_bookkeeping_median_s'] * 1e3:.1f} ms/step, optimizer/clip/callbacks "
                f"{results[f'{name}_optimizer_and_rest_median_s'] * 1e3:.1f} ms/step"
            )
    return "\n".join(lines)


def _target_line(results: Mapping[str, Any], key: str, of_medians: float | None) -> str:
    limit = TARGETS.get(key, (None, ""))[0]
    met = "" if limit is None else ("yes" if results[key] <= limit else "NO")
    return f"{key:<36} {results[key]:>7.3f} {_fmt(of_medians):>10} {_fmt(limit):>7}  {met}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = model_spec(args)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(bench.CONFIGS))
    if unknown or (args.profile is not None and args.profile not in bench.CONFIGS):
        raise SystemExit(f"unknown configurations {unknown or [args.profile]}; known: {', '.join(bench.CONFIGS)}")
    if args.profile is not None:
        print(bench.profile_cycle(args.profile, spec, args.cycle))
        return {}
    rounds = args.rounds if args.rounds is not None else (10 if args.quick else 6)
    started = time.perf_counter()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    memory = {} if args.no_memory else measure_memory_in_subprocesses(spec, names)
    timings = bench.time_configs(names, spec, rounds=rounds, warmup=args.warmup, cycle_steps=args.cycle, log=log)
    results: dict[str, Any] = {
        "model": spec.name,
        "batch_size": spec.batch_size,
        "param_count": sum(p.numel() for p in bench.make_model(spec).parameters()),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "measured_rounds": rounds,
        "warmup_rounds": args.warmup,
        "cycle_steps": args.cycle,
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
