"""Shared test settings."""

import torch

# One thread: the tests' models are tiny, and on a shared 2-core machine two OpenMP threads competing with
# other processes made steps up to 15x slower.
torch.set_num_threads(1)
