"""Shared test settings, and the slow tests: they run only with RUN_SLOW=1 (the transformers convention)."""

import os
import sys
from pathlib import Path

import pytest
import torch

# The recipe's modules (scripts/), the benchmark's (scripts/benchmarks/) and the GPU check's (scripts/gpu_check/) live
# beside the scripts that use them, not in the library; the tests import them from there.
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
for _folder in (SCRIPTS / "gpu_check", SCRIPTS / "benchmarks", SCRIPTS):
    sys.path.insert(0, str(_folder))

# One thread: the tests' models are tiny, and on a shared 2-core machine two OpenMP threads competing with
# other processes made steps up to 15x slower.
torch.set_num_threads(1)

RUN_SLOW = os.environ.get("RUN_SLOW", "").lower() in ("1", "true", "yes", "on")

# Slow: the module-scoped fixtures that start real 2-process runs (torchrun) or whole runs of a script. One DDP
# fixture stays in the default run (test_distributed.py's), so that the default run still checks 2-process DDP.
SLOW_FIXTURES = {
    "test_accelerate_loop.py": {"ddp_results"},
    "test_cheaper_v2.py": {"distributed_results"},
    "test_compare.py": {"study"},
    "test_fsdp2.py": {"fsdp_results"},
    "test_gpu_check.py": {"dry_run"},
    "test_plain_loop.py": {"distributed_results"},
    "test_previous_step.py": {"distributed_results"},
    "test_routing.py": {"routed"},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a slow test (a subprocess, a torchrun run, a docs block); RUN_SLOW=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that use a slow fixture, and skip every slow test unless RUN_SLOW=1."""
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run it (the full suite, as CI does)")
    for item in items:
        if SLOW_FIXTURES.get(item.path.name, set()) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if not RUN_SLOW and item.get_closest_marker("slow"):
            item.add_marker(skip)
