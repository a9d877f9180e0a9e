"""What the library's layout promises: no host sync in a GR step, the Trainer internals it uses still exist, one
place for each fact, and the checkpoint workaround only where transformers' key renaming bites."""

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    ViTConfig,
    ViTForImageClassification,
)

import hf_gr
from hf_gr import GRArguments, GRTrainer
from hf_gr._internal import checkpoint
from hf_gr.trainer import TRAINER_INTERNALS

from gpu_check_lib import count_host_syncs
from gr_testing import DictDataset, TinyNet, make_args, params_of


@pytest.mark.parametrize(
    "overrides",
    [dict(gr_lambda=0.05), dict(gr_lambda=0.1), dict(gr_lambda=0.05, gradient_accumulation_steps=2),
     dict(gr_lambda=0.1, gr_interval=2, gr_reuse=True)],
    ids=["alpha0.5", "alpha1", "accumulation", "reuse"],
)  # fmt: skip
def test_a_gr_step_reads_nothing_back_to_the_host(tmp_path, overrides):
    model = TinyNet(dropout=0.1)
    data = DictDataset(32)
    trainer = GRTrainer(model=model, args=make_args(tmp_path, **overrides))
    trainer.current_gradient_accumulation_steps = overrides.get("gradient_accumulation_steps", 1)
    trainer.training_step(model, data.batch(0, 8))  # warm-up (lazy allocations)
    with count_host_syncs() as gr:
        for step in range(2):  # with reuse: a GR step (t = 0) and a reuse step (t = 1)
            trainer.state.global_step = step
            trainer._gr_plan = None
            trainer.training_step(model, data.batch(8, 8))
    plain_model = TinyNet(dropout=0.1)
    plain = Trainer(model=plain_model, args=make_args(tmp_path))
    plain.current_gradient_accumulation_steps = 1
    with count_host_syncs() as stock:
        plain.training_step(plain_model, data.batch(8, 8))
    assert stock["n"] == 0  # the stock step syncs nothing on this model, so any count below is GR's own
    assert gr["n"] == 0


@pytest.mark.parametrize("gr_lambda", [0.0, 0.1], ids=["plain", "gr"])
def test_a_step_that_records_diagnostics_reads_nothing_back_to_the_host(tmp_path, gr_lambda):
    """A diagnostics step (‖g1‖ measured by gradient hooks on a plain step, the GR sums on a GR step) keeps its
    measurements on the device; they are read once, at log time."""
    model = TinyNet(dropout=0.1)
    data = DictDataset(32)
    trainer = GRTrainer(model=model, args=make_args(tmp_path, gr_lambda=gr_lambda, gr_diagnostics_steps=1))
    trainer.current_gradient_accumulation_steps = 1
    trainer.gr_metrics.recording = True
    trainer.training_step(model, data.batch(0, 8))  # warm-up (lazy allocations)
    with count_host_syncs() as counts:
        trainer.state.global_step = 1
        trainer._gr_plan = None
        trainer.training_step(model, data.batch(8, 8))
    assert counts["n"] == 0
    assert trainer.gr_metrics.pop_means()["gr_grad_norm"] > 0  # it did measure


def test_the_counter_sees_a_host_sync():
    with count_host_syncs() as counts:
        torch.ones(2).sum().item()
    assert counts["n"] == 1  # the test above can fail


def test_trainer_internals_gr_relies_on_still_exist(tmp_path):
    """GR reads these directly (no getattr default): a rename in transformers fails here, not silently."""
    trainer = GRTrainer(model=TinyNet(), args=make_args(tmp_path, max_steps=1), train_dataset=DictDataset(16))
    trainer.train()  # `current_gradient_accumulation_steps` is set by the training loop
    for name in TRAINER_INTERNALS:
        assert hasattr(trainer, name), name
        if name.startswith("_"):
            assert callable(getattr(Trainer, name)), name


def test_argument_help_equals_the_docstring():
    """One place for each fact: the help of every GR field is the text under its name in the docstring."""
    doc = " ".join(GRArguments.__doc__.split())
    for f in fields(GRArguments):
        entry = re.search(rf"{f.name} \(`[^`]*`(?:, [^)]*)?\): (.*?)(?= gr_\w+ \(`|$)", doc)
        assert entry, f.name
        assert " ".join(f.metadata["help"].split()) == entry.group(1).strip(), f.name


def _tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)  # fmt: skip
    return ViTForImageClassification(config)


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config)


def _saved_shifted_vit(folder):
    """A tiny ViT whose weights differ from a fresh one's, saved to `folder` (with the renamed keys)."""
    saved = _tiny_vit()
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(1.0)
    saved.save_pretrained(folder)
    return saved


def test_renamed_checkpoint_keys_are_loaded_into_the_existing_model(tmp_path, monkeypatch):
    saved = _saved_shifted_vit(tmp_path)
    target = _tiny_vit()
    files = checkpoint.checkpoint_files(str(tmp_path))
    assert checkpoint.skipped_keys(target, files)  # the bug: the stock loader would skip these
    # no second model is built on the way
    monkeypatch.setattr(ViTForImageClassification, "from_pretrained", lambda *a, **k: pytest.fail("second model"))
    assert checkpoint.load_renamed_weights(target, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(params_of(target), params_of(saved)))


def test_checkpoints_the_stock_loader_reads_whole_take_the_stock_path(tmp_path):
    saved = _tiny_llama()
    saved.save_pretrained(tmp_path)
    target = _tiny_llama()
    assert not checkpoint.skipped_keys(target, checkpoint.checkpoint_files(str(tmp_path)))
    assert not checkpoint.load_renamed_weights(target, str(tmp_path))  # nothing done: the stock loader runs
    assert not checkpoint.load_renamed_weights(TinyNet(), str(tmp_path))  # not a PreTrainedModel


def test_stock_trainer_drops_renamed_vit_weights(tmp_path):
    """The upstream bug itself (transformers#43701): if this starts passing, the workaround can go."""
    saved = _saved_shifted_vit(tmp_path)
    target = _tiny_vit()
    trainer = Trainer(model=target, args=make_args(tmp_path))
    trainer._load_from_checkpoint(str(tmp_path))
    assert not all(torch.equal(a, b) for a, b in zip(params_of(target), params_of(saved)))


# ---- the public surface, and no module reading another's private names ----

PUBLIC = {
    "hf_gr": {"GRArguments", "GRDiagnosticsCallback", "GRMixin", "GRTrainer", "GRTrainingArguments",
              "GRWarmupCallback", "GradientRegularizer", "LambdaWarmupCallback", "RWarmupCallback",
              "ZeroWarmupCallback"},
    "hf_gr.arguments": {"GRArguments", "GRTrainingArguments"},
    "hf_gr.callbacks": {"GRWarmupCallback", "LambdaWarmupCallback", "RWarmupCallback", "ZeroWarmupCallback"},
    "hf_gr.diagnostics": {"GRDiagnosticsCallback", "adaptive_lr_stats"},
    "hf_gr.regularizer": {"GradientRegularizer"},
    "hf_gr.trainer": {"GRMixin", "GRTrainer"},
}  # fmt: skip
# Private names of other libraries that hf_gr must touch: torch's fused ops, BatchNorm's base, SequentialLR's
# schedulers, a transformers config's `_name_or_path` (for the model card of a model without a base), and the
# Trainer's token count, which a GR step's second pass must not count twice.
FOREIGN_PRIVATE = {"_NormBase", "_schedulers", "_name_or_path", "_total_train_tokens"}


def test_the_public_surface_is_what_all_lists():
    import importlib

    for name, public in PUBLIC.items():
        module = importlib.import_module(name)
        assert set(module.__all__) == public, name
        assert all(hasattr(module, item) for item in public)
    modules = {p.stem for p in (Path(hf_gr.__file__).parent).glob("*.py")} - {"__init__"}
    assert {f"hf_gr.{m}" for m in modules} == set(PUBLIC) - {"hf_gr"}  # every other module is in hf_gr._internal


def test_no_module_reads_another_modules_private_names():
    """`x._name` only on `self`, `cls`, `super()`, a module's own names, or the foreign ones listed above; and no
    `from hf_gr... import _name`."""
    root = Path(hf_gr.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("hf_gr")):
                found += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("_")]
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            value = root = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls", "torch"):
                continue
            while isinstance(root, ast.Attribute):  # `Own.method._flag`: a chain from the module's own name
                root = root.value
            if isinstance(root, ast.Name) and root.id in own:
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
                continue
            if node.attr not in FOREIGN_PRIVATE:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
