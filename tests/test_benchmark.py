"""Smoke test of the benchmark's measurement functions on a tiny ViT (no timing assertions)."""

from __future__ import annotations

import math

import torch

import benchmarking as bench

REQUIRED_KEYS = (
    "plain_median_s",
    "gr_a0.5_median_s",
    "gr_a1_median_s",
    "zero_median_s",
    "exact_median_s",
    "peer_sam_median_s",
    "plain_ga2_median_s",
    "gr_ga2_median_s",
    "gr_over_plain",
    "zero_over_plain",
    "exact_over_plain",
    "gr_over_peer_sam",
    "gr_ga2_over_plain_ga2",
    "overhead_fraction",
    "extra_bytes_over_param_bytes",
    "extra_bytes_over_param_bytes_ga",
)


def test_benchmark_measurements_give_positive_ratios() -> None:
    spec = bench.VIT_TINY
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = bench.time_configs(list(bench.CONFIGS), spec, steps=2, warmup=1)
        names = ("plain", "gr_a0.5", "gr_a1", "plain_ga2", "gr_ga2")
        memory = {name: bench.measure_memory(name, spec, steps=1, warmup=1) for name in names}
    finally:
        torch.set_num_threads(threads)
    results = bench.summarize(timings, memory)

    missing = [key for key in REQUIRED_KEYS if key not in results]
    assert not missing, missing
    for key in REQUIRED_KEYS:
        value = results[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert 0 < results["overhead_fraction"] < 1
    # The buffers GR holds are at least the θ copy (and the put-aside accumulated gradient under accumulation).
    assert results["extra_bytes_over_param_bytes"] >= 0.99
    assert results["extra_bytes_over_param_bytes_ga"] >= 1.99
