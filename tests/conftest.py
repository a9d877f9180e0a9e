"""Shared test settings."""

import sys
from pathlib import Path

import torch

# The training recipe and the benchmark live beside the scripts that use them (scripts/), not in the library.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

# One thread: the tests' models are tiny, and on a shared 2-core machine two OpenMP threads competing with
# other processes made steps up to 15x slower.
torch.set_num_threads(1)
