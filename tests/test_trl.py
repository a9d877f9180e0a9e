"""GR in TRL's `SFTTrainer`: `GRSFTTrainer(GRMixin, SFTTrainer)` with `GRSFTConfig(GRArguments, SFTConfig)`.

A tiny random Llama and a word-level tokenizer are built here (offline). Checked: one GR step through `train()`
equals an independent reference on the batch the trainer saw (SFT's loss is the sum of the token NLLs over
`num_items_in_batch`); SFT's own metrics (entropy, token accuracy, token count), recorded inside `compute_loss`,
count pass 1 only; zero-warmup logs λ = 0 during W and runs GR after; a resumed run is bit-identical.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_gr import GRArguments, GRMixin  # noqa: E402

from gr_testing import max_rel_err  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
LAMBDA, R = 0.05, 0.1  # α = 0.5: both terms of (1 − α)·g1 + α·g2 matter
# transformers 5.24 renamed gradient_checkpointing (still accepted, with a FutureWarning) to activation_checkpointing
CHECKPOINTING = (
    "activation_checkpointing" if hasattr(SFTConfig, "activation_checkpointing") else "gradient_checkpointing"
)


@dataclass
class GRSFTConfig(GRArguments, SFTConfig):
    """SFTConfig with the GR fields (the README's recipe for any TrainingArguments subclass)."""


class GRSFTTrainer(GRMixin, SFTTrainer):
    """SFTTrainer with GR."""


def make_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_lm(tokenizer, seed: int = 0, dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, attention_dropout=dropout, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def make_text_dataset(n: int = 32, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=g))
        rows.append({"text": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (length,), generator=g))})
    return Dataset.from_list(rows)


def sft_args(tmp_path, config=SFTConfig, **overrides):
    """Exact CPU numbers: no bf16 autocast and, unless asked, no activation checkpointing (SFTConfig defaults)."""
    defaults = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4, max_length=32, logging_steps=1,
        seed=0, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
    )  # fmt: skip
    if config is GRSFTConfig:
        defaults.update(gr_lambda=LAMBDA, gr_r=R, gr_warmup_strategy="none")
    defaults[CHECKPOINTING] = False
    defaults.update(overrides)
    return config(**defaults)


class Recorder(TrainerCallback):
    """The gradient the optimizer is about to apply, and the forwards per optimizer step."""

    def __init__(self, model):
        self.grads, self.forwards, self._count = [], [], 0
        model.register_forward_pre_hook(self._forward)

    def _forward(self, module, args):
        self._count += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in model.parameters() if p.requires_grad])

    def on_step_end(self, args, state, control, **kwargs):
        self.forwards.append(self._count)
        self._count = 0


class CapturingGRSFTTrainer(GRSFTTrainer):
    """Records each micro-batch exactly as the training loop hands it to `training_step`."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", []) + [({k: v for k, v in inputs.items()}, num_items_in_batch)]
        return super().training_step(model, inputs, num_items_in_batch)


def sft_loss(model, params, batch, num_items):
    """Σ token NLL / num_items_in_batch, from the logits (no TRL code)."""
    out = functional_call(model, params, args=(), kwargs={"input_ids": batch["input_ids"],
                                                          "attention_mask": batch["attention_mask"]})  # fmt: skip
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / num_items


def reference_sft_gr_grad(model, batch, num_items):
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def grad_at(point):
        leaves = {n: p.clone().requires_grad_(True) for n, p in point.items()}
        return list(torch.autograd.grad(sft_loss(model, leaves, batch, num_items), list(leaves.values())))

    g1 = grad_at(params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    g2 = grad_at({n: p + (R / norm).float() * g for (n, p), g in zip(params.items(), g1)})
    alpha = LAMBDA / R
    return [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2)]


@pytest.mark.parametrize("checkpointing", [False, True])  # True: recomputed activations, same gradient
def test_sft_gr_step_matches_reference_on_the_batch_the_trainer_saw(tmp_path, checkpointing):
    tokenizer = make_tokenizer()
    model, reference = make_lm(tokenizer), make_lm(tokenizer)
    args = sft_args(tmp_path, GRSFTConfig, max_steps=1, **{CHECKPOINTING: checkpointing})
    trainer = CapturingGRSFTTrainer(
        model=model, args=args, train_dataset=make_text_dataset(), processing_class=tokenizer
    )
    recorder = Recorder(model)
    trainer.add_callback(recorder)
    trainer.train()
    assert getattr(model, f"is_{CHECKPOINTING}") == checkpointing
    ((batch, num_items),) = trainer.seen
    assert num_items == batch["labels"][:, 1:].ne(-100).sum()  # SFT's normalizer: the step's target tokens
    assert (batch["labels"] == -100).any()  # padded rows: the normalizer is not the mean over positions
    assert recorder.forwards == [2]
    assert max_rel_err(recorder.grads[0], reference_sft_gr_grad(reference, batch, num_items)) < 1e-5


def test_sft_one_pass_sam_steps_along_the_previous_applied_gradient(tmp_path):
    """`gr_ascent_direction="previous_step"` in SFT: step 0 plain (zero-warmup, W = 1), step 1 one pass at
    θ1 + r·g0/‖g0‖, whose gradient is the update; both checked against SFT's loss written here."""
    tokenizer = make_tokenizer()
    model, reference = make_lm(tokenizer), make_lm(tokenizer)
    args = sft_args(tmp_path, GRSFTConfig, max_steps=2, gr_lambda=R, gr_warmup_strategy="zero", gr_warmup_steps=1,
                    gr_ascent_direction="previous_step")  # fmt: skip
    trainer = CapturingGRSFTTrainer(model=model, args=args, train_dataset=make_text_dataset(),
                                    processing_class=tokenizer)  # fmt: skip
    recorder = Recorder(model)
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.forwards == [1, 1]

    def grad_at(point, batch, num_items):
        leaves = {n: p.clone().requires_grad_(True) for n, p in point.items()}
        return list(torch.autograd.grad(sft_loss(reference, leaves, batch, num_items), list(leaves.values())))

    theta0 = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    g0 = grad_at(theta0, *trainer.seen[0])
    theta1 = {n: p - 0.1 * g for (n, p), g in zip(theta0.items(), g0)}  # SGD, lr 0.1
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g0)).float()
    g1 = grad_at({n: p + R / norm * g for (n, p), g in zip(theta1.items(), g0)}, *trainer.seen[1])
    assert max_rel_err(recorder.grads[0], g0) < 1e-5
    assert max_rel_err(recorder.grads[1], g1) < 1e-5


def _sft_run(tmp_path, name, trainer_cls, config, **overrides):
    tokenizer = make_tokenizer()
    model = make_lm(tokenizer, dropout=0.1)
    args = sft_args(tmp_path, config, output_dir=str(tmp_path / name), max_steps=4, gradient_accumulation_steps=2,
                    optim="adamw_torch", learning_rate=1e-2, **overrides)  # fmt: skip
    trainer = trainer_cls(model=model, args=args, train_dataset=make_text_dataset(), processing_class=tokenizer)
    recorder = Recorder(model)
    trainer.add_callback(recorder)
    return trainer, recorder


def test_sft_metrics_count_pass_one_zero_warmup_and_bit_identical_resume(tmp_path):
    # GA 2, zero-warmup over W = 2 steps, checkpoint after step 3 (a GR step), resume for step 4.
    plain, _ = _sft_run(tmp_path, "plain", SFTTrainer, SFTConfig)
    plain.train()
    gr, recorder = _sft_run(tmp_path, "gr", GRSFTTrainer, GRSFTConfig, gr_warmup_strategy="zero", gr_warmup_steps=2,
                            save_strategy="steps", save_steps=3)  # fmt: skip
    gr.train()
    logs = [e for e in gr.state.log_history if "loss" in e]
    plain_logs = [e for e in plain.state.log_history if "loss" in e]

    assert [e["gr_lambda"] for e in logs] == [0.0, 0.0, LAMBDA, LAMBDA]  # λ = 0 during W, GR after
    assert recorder.forwards == [2, 2, 4, 4]  # GA 2: one pass per micro-batch in W, two after
    # Token counts are SFT's running total: pass 2 must not add to it.
    assert [e["num_tokens"] for e in logs] == [e["num_tokens"] for e in plain_logs]
    # Steps 1-3 start from the same weights as plain training (zero-warmup steps are plain steps), so their
    # entropy and token accuracy, averaged over the step's compute_loss calls, equal plain training's only if the
    # GR step 3 recorded pass 1 alone (pass 2 at θ + ε would shift the mean).
    for got, want in zip(logs[:3], plain_logs[:3]):
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)
    assert logs[3]["loss"] != pytest.approx(plain_logs[3]["loss"], rel=1e-6)  # GR changed the weights

    resumed, _ = _sft_run(tmp_path, "resumed", GRSFTTrainer, GRSFTConfig, gr_warmup_strategy="zero",
                          gr_warmup_steps=2)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "gr" / "checkpoint-3"))
    assert all(torch.equal(a, b) for a, b in zip(gr.model.state_dict().values(), resumed.model.state_dict().values()))
    # (SFT's running token count is not in a checkpoint: a resumed SFTTrainer counts from 0, GR or not.)
    assert [e for e in resumed.state.log_history if "loss" in e][-1]["gr_lambda"] == LAMBDA


def test_a_config_without_gr_fields_is_refused_naming_the_recipe(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(TypeError, match=r"GRArguments, SFTConfig"):
        GRSFTTrainer(model=make_lm(tokenizer), args=sft_args(tmp_path, SFTConfig), processing_class=tokenizer,
                     train_dataset=make_text_dataset(4))  # fmt: skip
