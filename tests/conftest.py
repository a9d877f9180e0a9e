"""Shared test settings."""

import sys
from pathlib import Path

import torch

# The recipe's modules (scripts/), the benchmark's (scripts/benchmarks/) and the GPU check's (scripts/gpu_check/) live
# beside the scripts that use them, not in the library; the tests import them from there.
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
for _folder in (SCRIPTS / "gpu_check", SCRIPTS / "benchmarks", SCRIPTS):
    sys.path.insert(0, str(_folder))

# One thread: the tests' models are tiny, and on a shared 2-core machine two OpenMP threads competing with
# other processes made steps up to 15x slower.
torch.set_num_threads(1)
