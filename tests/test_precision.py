"""GR in low and high precision: the reuse direction's accuracy, and GR micro-batches that had no direction."""

import logging

import pytest
import torch
import torch.nn.functional as F

from hf_gr import GradientRegularizer, GRArguments

from gr_testing import DictDataset, TinyNet, make_args, reference_reuse_direction

# ---- reuse (LookSAM): u and ρ against float64 written from the definitions ----


@pytest.mark.parametrize(
    "dtype, rho_tolerance, min_cosine",
    [(torch.float64, 1e-12, 1 - 1e-12), (torch.bfloat16, 1e-2, 0.999)],
    ids=["float64", "bfloat16"],
)
def test_reuse_direction_matches_a_float64_reference(dtype, rho_tolerance, min_cosine):
    """u and ρ from the step's own g1 and g_GR (in the weights' dtype), computed in float64 by the reference: what
    is left is the reuse arithmetic's own error (here, with u in bf16: ρ 4 % off, cos 0.94; with float32 sums for
    float64 weights: ρ 3e-8 off)."""
    model = TinyNet().to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in DictDataset(64).batch(0, 32).items()}
    params = list(model.parameters())

    def loss_fn():
        return F.cross_entropy(model(batch["x"])["logits"], batch["labels"])

    g1 = torch.autograd.grad(loss_fn(), params)  # pass 1's g1: the same forward and backward at θ
    regularizer = GradientRegularizer(
        model, args=GRArguments(gr_lambda=0.01, gr_r=0.02, gr_reuse=True, gr_warmup_strategy="none")
    )
    regularizer.backward(loss_fn)
    g_gr = [p.grad for p in params]
    assert all(g.dtype == dtype for g in g_gr)
    u_ref, rho_ref = reference_reuse_direction(g_gr, list(g1))
    u = regularizer.passes.reuse.flat.double()
    u_ref = torch.cat(u_ref)
    rho = float(regularizer.passes.reuse.rho)
    assert rho_ref > 1e-3  # a real correction
    assert abs(rho - rho_ref) / rho_ref < rho_tolerance
    assert float(u @ u_ref / (u.norm() * u_ref.norm())) >= min_cosine
    if dtype == torch.float64:
        assert float((u - u_ref).norm()) < 1e-12


def test_reuse_direction_is_kept_in_float32_for_half_precision_weights():
    model = TinyNet().to(torch.bfloat16)
    args = GRArguments(gr_lambda=0.05, gr_r=0.1, gr_reuse=True, gr_warmup_strategy="none")
    reuse = GradientRegularizer(model, args=args).passes.reuse
    reuse.allocate(list(model.parameters()))
    assert reuse.flat.dtype == torch.float32
    assert reuse.flat.numel() == sum(p.numel() for p in model.parameters())


# ---- GR micro-batches without a direction: counted on the device, logged, warned about once ----


def test_micro_batches_without_a_direction_are_counted():
    """A zero g1 has no direction: that GR micro-batch runs as a plain step, and counts (1 of 2 here)."""
    model, data = TinyNet(), DictDataset(32)
    regularizer = GradientRegularizer(model, args=GRArguments(gr_lambda=0.05, gr_r=0.1, gr_warmup_strategy="none"))
    assert regularizer.passes.pop_degenerate_fraction() is None  # nothing ran yet
    for scale in (0.0, 1.0):
        batch = data.batch(0, 8)
        regularizer.backward(lambda batch=batch, scale=scale: model(**batch)["loss"] * scale)
    fraction = regularizer.passes.pop_degenerate_fraction()
    assert isinstance(fraction, torch.Tensor) and float(fraction) == 0.5
    assert regularizer.passes.pop_degenerate_fraction() is None  # popped


def _fp16_trainer(tmp_path, loss_scale: float):
    """fp16 weights, no loss scaler: a loss scaled by 1e-6 gives gradients that underflow below fp16's norm floor."""
    model = TinyNet().to(torch.float16)

    def loss(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs["logits"].float(), labels) * loss_scale

    data = DictDataset(32, dtype=torch.float16)
    args = make_args(tmp_path, max_steps=2, logging_steps=1, optim="sgd", learning_rate=0.1, gr_lambda=0.05,
                     gr_r=0.1, max_grad_norm=0.0)  # fmt: skip
    from hf_gr import GRTrainer

    return GRTrainer(model=model, args=args, train_dataset=data, compute_loss_func=loss)


@pytest.mark.parametrize("loss_scale, fraction", [(1e-6, 1.0), (1.0, 0.0)], ids=["underflow", "normal"])
def test_degenerate_fraction_is_logged_and_warned_about_once(tmp_path, caplog, loss_scale, fraction):
    trainer = _fp16_trainer(tmp_path, loss_scale)
    with caplog.at_level(logging.WARNING, logger="hf_gr"):
        trainer.train()
    logged = [e["gr_degenerate_fraction"] for e in trainer.state.log_history if "gr_degenerate_fraction" in e]
    assert logged == [fraction, fraction]  # one entry per logged step
    warnings = [r for r in caplog.records if "gr_degenerate_fraction" in r.getMessage()]
    assert len(warnings) == (1 if fraction else 0)  # once, not at every log
