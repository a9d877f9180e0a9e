"""Metrics shipped with hf_gr as `evaluate` modules, loaded by path (no Hub access needed)."""

from pathlib import Path

ACCURACY_PATH = str(Path(__file__).with_name("accuracy.py"))

__all__ = ["ACCURACY_PATH"]
