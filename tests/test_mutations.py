"""The suite catches the ways GR can silently go wrong: each deliberate breakage of the library fails a named test.

Each mutation (`tests/gr_mutations.py`) patches one module-level function of hf_gr. The test named to catch it must
pass on the library as it is, then fail by an assertion (not by a crash) with the mutation applied, and the patched
function must have run.
"""

from __future__ import annotations

import importlib
import inspect
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
    "ascent_on_the_whole_batch": (
        "test_cheaper_v2", "test_sub_batch_ascent_with_accumulation_matches_the_reference", {}
    ),
    "ramp_ignored": ("test_cheaper_v2", "test_training_draws_the_ramped_steps", {}),
    "sharpness_not_a_rise": (
        "test_cheaper_v2", "test_sharpness_equals_the_perturbed_loss_rise_averaged_over_the_gr_steps_of_each_log", {}
    ),
    "theta_not_restored": ("test_gr_step", "test_parameters_restored_bit_exactly", {}),
    "every_backward_ends_a_step": ("test_plain_loop", "test_a_short_last_step_ends_where_told", {}),
    "missing_gradient_not_zero": (
        "test_routing", "test_single_process_gr_counts_a_missing_gradient_as_zero",
        dict(accumulation=2, alpha=0.5, diagnostics=False),
    ),
    "previous_direction_stale": (
        "test_previous_step", "test_training_steps_along_the_previous_applied_gradient",
        dict(accumulation=1, overrides={}, kinds=["gr"] * 4),
    ),
    "previous_direction_not_restored": ("test_previous_step", "test_custom_loop_reads_d_at_the_optimizer_step", {}),
    "previous_direction_not_saved": ("test_previous_step", "test_resume_is_bit_identical", {}),
    "previous_direction_kept_after_skip": (
        "test_previous_step", "test_after_a_step_the_fp16_scaler_skipped_a_gr_step_takes_two_passes", {}
    ),
    "previous_direction_not_finite": (
        "test_previous_step", "test_one_non_finite_entry_sets_d_to_zero", dict(bad=float("nan"))
    ),
    "resume_changes_unseen": (
        "test_silent_trainer", "test_resume_with_changed_settings_warns_and_records_each_range",
        dict(restore_callbacks=False),
    ),
}


def test_every_mutation_has_a_named_test():
    assert set(CAUGHT_BY) == set(gr_mutations.MUTATIONS)


@pytest.mark.parametrize("mutation", sorted(gr_mutations.MUTATIONS))
def test_mutation_is_caught(tmp_path, monkeypatch, caplog, mutation):
    module, name, params = CAUGHT_BY[mutation]
    test = getattr(importlib.import_module(module), name)
    wants = inspect.signature(test).parameters
    for run in ("unmutated", "mutated"):
        (tmp_path / run).mkdir()

    def run_test(run: str) -> None:  # the fixtures the test asks for, then its parameters
        fixtures = {"tmp_path": tmp_path / run, "caplog": caplog}
        caplog.clear()
        test(**{k: v for k, v in fixtures.items() if k in wants}, **params)

    run_test("unmutated")  # the named test passes on the library as it is
    calls = gr_mutations.apply(mutation, monkeypatch)
    with pytest.raises(AssertionError) as failure:
        run_test("mutated")
    assert Path(failure.traceback[-1].path).name == f"{module}.py"  # one of the test's own assertions failed
    assert calls.count > 0  # the broken function ran
