"""scripts/gpu_check/gpu_check.py: the dry run writes every key of the device check, and its CPU-computable checks
pass; the carried data survives its coding; the GPU augmentation crops what it should; a broken GR step fails the
check."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_gr._internal import gradient

import gpu_check
import gpu_check_correctness as correctness
import gpu_check_lib as lib

MODES = ("plain", "gr", "gr_p0.5", "gr_k4", "gr_k4_reuse", "gr_ascent25", "gr_ascent25_p0.5", "gr_previous")
MODE_KEYS = ("images_per_s", "step_ms", "cost_vs_plain", "peak_memory_mib", "gr_step_fraction", "first_step_s")
REPRO_RUN_KEYS = ("eval_error", "eval_error_exact_rows", "curve", "epochs_done", "steps", "gr_warmup_steps",
                  "stopped_early_at_step", "train_s", "images_per_s", "final_train_loss")  # fmt: skip
CHECKS = ("fp32", "bf16", "fp16", "dropout_replay", "skipped_step", "host_sync", "previous_step_host_sync", "fsdp2",
          "multi_device_norm")  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # A data file that does not exist: the dry run synthesizes its images (as in CI, where none is carried).
    rc = gpu_check.main(["--dry-run", "--out", str(out), "--data", str(out / "absent.npz")])
    return rc, json.loads((out / "gpu_check.json").read_text()), out


def test_dry_run_writes_every_key(dry_run):
    rc, result, out = dry_run
    assert rc == 0
    assert (out / "gpu_check.log").read_text().count("correctness") >= len(CHECKS)
    meta = result["meta"]
    assert meta["dry_run"] is True and meta["device"] == "cpu"
    for key in ("torch", "transformers", "accelerate", "python", "budget_s", "elapsed_s"):
        assert meta[key] is not None, key
    assert {name: s["status"] for name, s in meta["sections"].items()} == dict.fromkeys(gpu_check.SECTIONS, "done")

    assert set(CHECKS) <= set(result["correctness"])
    for model in ("vit-s", "vit-b"):
        modes = result["throughput"]["models"][model]["modes"]
        assert set(modes) == set(MODES)
        for mode in MODES:
            assert set(MODE_KEYS) <= set(modes[mode]), (model, mode)
        assert "peak_memory_gr_over_plain" in result["throughput"]["models"][model]
    runs = result["reproduction"]["runs"]
    assert set(runs) == {"plain", "gr", "gr_zero_warmup"}
    for run in runs.values():
        assert set(REPRO_RUN_KEYS) <= set(run)
    assert result["compile"]["status"].startswith("skipped") and set(result["compile"]["modes"]) == {"plain", "gr"}


def test_dry_run_correctness_checks_pass(dry_run):
    _, result, _ = dry_run
    c = result["correctness"]
    assert c["passed"] is True
    assert c["fp32"]["rel_err"] < c["fp32"]["tolerance"] <= 1e-6  # float32 GR gradient against float64
    for precision in ("bf16", "fp16"):
        check = c[precision]
        assert check["passed"] is True, check
        assert check["rel_err"] <= check["tolerance"] and check["rel_err"] < 0.25 * check["gr_vs_plain_distance"]
    assert c["fp16"]["grad_scaler"].startswith("GradScaler") and c["bf16"]["mixed_precision"] == "bf16"
    assert c["dropout_replay"]["rel_err_same_masks"] <= 0.05 * c["dropout_replay"]["rel_err_other_masks"]
    skipped = c["skipped_step"]
    assert skipped["params_unchanged"] and skipped["scale_backed_off"] and skipped["scheduler_not_stepped"]
    assert skipped["other_steps_taken"] and skipped["scale_after"] == skipped["scale_before"] / 2
    assert c["host_sync"]["python_reads_gr_step"] == 0 and c["host_sync"]["passed"] is True
    one_pass = c["previous_step_host_sync"]
    assert one_pass["python_reads_gr_step"] == one_pass["python_reads_stock_step"]  # the optimizer's alone
    assert one_pass["passes"] == 1 and one_pass["passed"] is True
    assert c["fsdp2"]["gr_step_passed"] is True and c["fsdp2"]["rel_err"] < 1e-6, c["fsdp2"]  # torchrun, world 1
    assert c["fsdp2"]["world_size"] == 1 and "error" not in c["fsdp2"]
    assert c["fsdp2"]["diagnostics_logged"] is True, c["fsdp2"]  # the diagnostics step under FSDP2 ran
    assert c["multi_device_norm"]["passed"] is True


def test_dry_run_measures_every_mode(dry_run):
    _, result, _ = dry_run
    for model in ("vit-s", "vit-b"):
        modes = result["throughput"]["models"][model]["modes"]
        assert all(modes[m]["images_per_s"] > 0 for m in MODES)
        assert modes["plain"]["cost_vs_plain"] == 1.0 and modes["gr"]["gr_step_fraction"] == 1.0
        assert modes["gr_k4"]["gr_step_fraction"] == 0.25 == modes["gr_k4_reuse"]["gr_step_fraction"]
    repro = result["reproduction"]
    assert repro["data"]["source"] == "synthetic" and repro["epochs"] >= 1
    for run in repro["runs"].values():
        assert 0 <= run["eval_error"] <= 100 and run["steps"] == repro["epochs"] * repro["steps_per_epoch"]
        assert len(run["curve"]) == repro["epochs"]
    assert repro["runs"]["gr_zero_warmup"]["gr_warmup_steps"] > 0


def _dry_context(tmp_path) -> gpu_check.Context:
    return gpu_check.Context(out=tmp_path, dry_run=True, budget_s=60, data_path=tmp_path / "absent.npz")


def test_the_float64_check_fails_when_gr_is_broken(tmp_path, monkeypatch):
    """Without the perturbation the step is plain: the check must say so (the dry run's pass is not vacuous)."""
    monkeypatch.setattr(gradient, "perturb_", lambda params, grads, r, divisor: None)
    check = correctness.gr_vs_float64(_dry_context(tmp_path), "fp32")
    assert check["passed"] is False and check["rel_err"] > 0.5 * check["gr_vs_plain_distance"]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_prepared_data_round_trips_exactly(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    images = {split: rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for split, n in (("train", 40), ("test", 8))}
    labels = {"train": np.arange(40) % 10, "test": np.arange(8) % 10}
    for split in images:
        table = pa.table({"img": [{"bytes": _png(x), "path": None} for x in images[split]], "label": labels[split]})
        pq.write_table(table, tmp_path / f"{split}.parquet")
    rows = "".join(f"{i},{'exact' if i < 3 else 'jpeg'},x\n" for i in range(8))
    (tmp_path / "test_provenance.csv").write_text("row(original_test_index),pixels,source\n" + rows)
    info = lib.prepare_data(tmp_path / "data", tmp_path, n_train=20, n_test=6)
    assert info["train"] == 20 and info["test"] == 6 and info["test_exact"] == 3
    data = lib.load_data(tmp_path / "data" / lib.DATA_FILE)
    chosen = np.sort(np.concatenate([np.flatnonzero(labels["train"] == c)[:2] for c in range(10)]))  # balanced
    assert np.array_equal(data.train_x.numpy(), images["train"][chosen])
    assert np.array_equal(data.train_y.numpy(), labels["train"][chosen])
    assert np.array_equal(data.test_x.numpy(), images["test"][:6])
    assert data.test_exact.tolist() == [True] * 3 + [False] * 3


def test_coding_is_exactly_invertible_and_compresses():
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.integers(-3, 4, (16, 3, 32, 32)), axis=-1).clip(0, 255).astype(np.uint8)
    coded = lib.encode_images(smooth)
    assert coded.dtype == np.uint8 and np.array_equal(lib.decode_images(coded), smooth)
    noise = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    assert np.array_equal(lib.decode_images(lib.encode_images(noise)), noise)


def test_gpu_augmentation_is_a_flip_and_a_crop_of_the_reflect_padded_image():
    data = lib.synthetic_data(6, 1)
    batch = lib.AugmentingCollator(data.train_x, data.train_y, seed=3)([0, 1, 2, 3, 4, 5])
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and torch.equal(batch["labels"], data.train_y)
    mean = torch.tensor(lib.CIFAR_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(lib.CIFAR_STD).view(3, 1, 1) * 255
    shifted = 0
    for i in range(6):
        got = (batch["pixel_values"][i] * std + mean).round()
        original = data.train_x[i].float()
        padded = {flip: F.pad((original.flip(-1) if flip else original)[None], (4, 4, 4, 4), mode="reflect")[0]
                  for flip in (False, True)}  # fmt: skip
        crops = [(flip, dy, dx) for flip in (False, True) for dy in range(9) for dx in range(9)
                 if torch.equal(got, padded[flip][:, dy : dy + 32, dx : dx + 32])]  # fmt: skip
        assert crops, i  # each output is some flip + crop of its own image
        shifted += all(c[1:] != (4, 4) for c in crops)
    assert shifted > 0  # and not always the centre crop


def test_compile_worker_runs_with_the_eager_backend(tmp_path):
    """The compile section's worker (GPU: inductor) runs end to end on CPU with dynamo's eager backend."""
    out = tmp_path / "compile.json"
    try:
        gpu_check.compile_worker(_dry_context(tmp_path), out)
    finally:
        torch._dynamo.reset()
    result = json.loads(out.read_text())
    assert result["status"] == "ok", result
    assert result["modes"]["gr"]["gr_step_fraction"] == 1.0 and result["modes"]["plain"]["images_per_s"] > 0


def test_the_pages_claim_no_gpu_result_that_was_not_measured():
    """Until the check has run on a GPU, its page and the README say so, and give no duration as a measurement."""
    root = Path(__file__).resolve().parents[1]
    page = " ".join((root / "docs" / "gpu-check.md").read_text(encoding="utf-8").split())
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    if "Not yet run on a GPU" in page:
        assert "It takes about" not in page and "an estimate, not a measurement" in page
        assert "On a GPU: not yet run." in readme
