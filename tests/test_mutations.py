"""The suite catches the ways GR can silently go wrong: each deliberate breakage of the library fails a named test.

Each mutation (`tests/gr_mutations.py`) patches one module-level function of hf_gr. The test named to catch it must
pass on the library as it is, then fail by an assertion (not by a crash) with the mutation applied, and the patched
function must have run.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import gr_mutations

WARMUP = ("test_warmup", "test_each_step_applies_and_logs_the_warmup_formulas")

# mutation → the test that catches it (module, name) and its parameters
CAUGHT_BY = {
    "gr_off": (*WARMUP, dict(strategy="none", w_from="lr_warmup")),
    "alpha_ignored": ("test_gr_step", "test_two_pass_gradient_matches_reference", dict(gr_lambda=0.05)),
    "radius_ignored": (*WARMUP, dict(strategy="r", w_from="lr_warmup")),
    "warmup_ignored": (*WARMUP, dict(strategy="lambda", w_from="lr_warmup")),
    "reuse_rho_ignores_alpha": ("test_cheaper_modes", "test_reuse_training_equals_a_simulation", dict(gr_lambda=0.1)),
    "reuse_not_applied": ("test_cheaper_modes", "test_reuse_training_equals_a_simulation", dict(gr_lambda=0.2)),
    "pass2_not_combined": ("test_gr_step", "test_gradient_accumulation_is_mean_of_micro_batch_gr_gradients", {}),
    "dropout_not_replayed": ("test_gr_step", "test_two_pass_gradient_matches_reference", dict(gr_lambda=0.1)),
}


def test_every_mutation_has_a_named_test():
    assert set(CAUGHT_BY) == set(gr_mutations.MUTATIONS)


@pytest.mark.parametrize("mutation", sorted(gr_mutations.MUTATIONS))
def test_mutation_is_caught(tmp_path, monkeypatch, mutation):
    module, name, params = CAUGHT_BY[mutation]
    test = getattr(importlib.import_module(module), name)
    for run in ("unmutated", "mutated"):
        (tmp_path / run).mkdir()
    test(tmp_path / "unmutated", **params)  # the named test passes on the library as it is
    calls = gr_mutations.apply(mutation, monkeypatch)
    with pytest.raises(AssertionError) as failure:
        test(tmp_path / "mutated", **params)
    assert Path(failure.traceback[-1].path).name == f"{module}.py"  # one of the test's own assertions failed
    assert calls.count > 0  # the broken function ran
