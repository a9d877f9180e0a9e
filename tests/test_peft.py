"""GR with PEFT LoRA on a tiny ViT: GR acts on the adapter (the trainable parameters) only.

Checked: the step's gradient equals the GR reference restricted to the trainable parameters (ε from their norm;
the frozen base gets no gradient); after training the frozen base is bit-identical; checkpoints hold the adapter,
and resuming from one ends bit-identical to the uninterrupted run.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification  # noqa: E402

from hf_gr import GRTrainer  # noqa: E402

from gr_testing import make_args, max_rel_err  # noqa: E402

LAMBDA, R = 0.05, 0.1


def make_vit(seed: int = 0, dropout: float = 0.0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=dropout,
                       attention_probs_dropout_prob=dropout)  # fmt: skip
    return ViTForImageClassification(config)


def with_lora(model: ViTForImageClassification) -> PeftModel:
    # transformers 5.x names ViT's attention projections q_proj/k_proj/v_proj/o_proj (4.x: query/key/value).
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["classifier"])  # fmt: skip
    return get_peft_model(model, config)


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Capture(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
        )


class CapturingGRTrainer(GRTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = dict(inputs)
        return super().training_step(model, inputs, num_items_in_batch)


def reference_on_trainable(model, batch):
    """(1 − α)·g1 + α·g2 over the trainable parameters only (ε from their norm), frozen ones held fixed."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def grad_at(point):
        leaves = {n: p.clone().requires_grad_(True) for n, p in point.items()}
        logits = functional_call(model, leaves, args=(), kwargs={"pixel_values": batch["pixel_values"]}).logits
        return list(torch.autograd.grad(F.cross_entropy(logits, batch["labels"]), list(leaves.values())))

    g1 = grad_at(params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    g2 = grad_at({n: p + (R / norm).float() * g for (n, p), g in zip(params.items(), g1)})
    alpha = LAMBDA / R
    return dict(zip(params, [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2)]))


def _args(tmp_path, name, **overrides):
    return make_args(tmp_path, output_dir=str(tmp_path / name), gr_lambda=LAMBDA, gr_r=R, remove_unused_columns=False,
                     **overrides)  # fmt: skip


def test_gr_acts_on_the_adapter_only(tmp_path):
    model, reference = with_lora(make_vit()), with_lora(make_vit())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    args = _args(tmp_path, "one", max_steps=1, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant")
    trainer = CapturingGRTrainer(model=model, args=args, train_dataset=Images())
    capture = Capture()
    trainer.add_callback(capture)
    trainer.train()
    (grads,) = capture.grads
    assert all(grads[n] is None for n in grads if n not in trainable)  # the frozen base gets no gradient
    want = reference_on_trainable(reference, trainer.seen)
    assert max_rel_err([grads[n] for n in want], list(want.values())) < 1e-5


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_frozen_base_untouched_and_adapter_resume_is_bit_identical(tmp_path):
    common = dict(max_steps=6, learning_rate=1e-2, gr_warmup_strategy="zero", gr_warmup_steps=2, logging_steps=1,
                  save_strategy="steps", save_steps=3)  # fmt: skip
    model = with_lora(make_vit(dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = _snapshot(model)
    GRTrainer(model=model, args=_args(tmp_path, "full", **common), train_dataset=Images()).train()
    after = _snapshot(model)
    frozen = [k for k in before if k not in trainable]
    assert len(frozen) + len(trainable) == len(before)
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the base, bit for bit
    assert all(not torch.equal(before[k], after[k]) for k in before if k not in frozen)  # every adapter tensor moved

    checkpoint = tmp_path / "full" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files  # the adapter, not the base

    resumed = with_lora(make_vit(dropout=0.1))
    with torch.no_grad():  # a silent non-load would show
        for p in resumed.parameters():
            if p.requires_grad:
                p.add_(0.5)
    GRTrainer(model=resumed, args=_args(tmp_path, "resumed", **common), train_dataset=Images()).train(
        resume_from_checkpoint=str(checkpoint)
    )
    assert all(torch.equal(a, b) for a, b in zip(after.values(), _snapshot(resumed).values()))

    # The final adapter saves and loads onto a fresh base like any PEFT adapter.
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make_vit(dropout=0.1), tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(after.values(), _snapshot(loaded).values()))
