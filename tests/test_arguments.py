"""GRTrainingArguments: fields on the command line, bad values refused with the field's name."""

import pytest
from transformers import HfArgumentParser

from hf_gr import GRTrainingArguments


def test_cli_parses_gr_fields(tmp_path):
    (args,) = HfArgumentParser(GRTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--gr_lambda", "0.08", "--gr_r", "0.05", "--gr_warmup_strategy", "r",
            "--gr_warmup_steps", "100", "--gr_method", "exact", "--gr_sync_perturbation", "true", "--use_cpu",
        ]
    )  # fmt: skip
    assert (args.gr_lambda, args.gr_r, args.gr_warmup_strategy, args.gr_warmup_steps) == (0.08, 0.05, "r", 100)
    assert args.gr_method == "exact" and args.gr_sync_perturbation is True
    assert args.gr_alpha == pytest.approx(1.6)


def test_defaults_are_the_papers_recipe(tmp_path):
    args = GRTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert (args.gr_lambda, args.gr_r, args.gr_warmup_strategy) == (0.1, 0.1, "zero")
    assert args.gr_method == "finite_difference"
    assert args.gr_warmup_steps is None and args.gr_sync_perturbation is False


def test_help_lists_gr_fields():
    text = HfArgumentParser(GRTrainingArguments).format_help()
    for name in ("--gr_lambda", "--gr_r", "--gr_warmup_strategy", "--gr_warmup_steps", "--gr_method"):
        assert name in text


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("gr_lambda", -0.1, ">= 0"),
        ("gr_lambda", float("nan"), ">= 0"),
        ("gr_lambda", float("inf"), ">= 0"),
        ("gr_r", 0.0, "> 0"),
        ("gr_r", -1.0, "> 0"),
        ("gr_r", float("nan"), "> 0"),
        ("gr_warmup_strategy", "linear", "none, lambda, r, zero"),
        ("gr_method", "hessian", "finite_difference, exact"),
        ("gr_warmup_steps", -5, "integer >= 0"),
        ("gr_diagnostics_steps", -1, ">= 0"),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path, field, value, allowed):
    with pytest.raises(ValueError, match=field) as err:
        GRTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **{field: value})
    assert allowed in str(err.value)


def test_cli_refuses_unknown_strategy(tmp_path, capsys):
    parser = HfArgumentParser(GRTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--gr_warmup_strategy", "linear"])
    assert "gr_warmup_strategy" in capsys.readouterr().err
