"""Loading a Trainer checkpoint's weights back into a live model when transformers' key renaming would drop them.

Upstream cause (transformers 5.x; huggingface/transformers#43701, #48805): some models' parameters are renamed
when loaded (`conversion_mapping.py`; ViT: `encoder.layer.N.attention.attention.query` → `layers.N.attention.q_proj`)
and renamed back when saved. `Trainer._load_from_checkpoint` and `_load_best_model` call `model.load_state_dict`
on the saved file without the renaming, so every renamed weight is skipped with only a "missing keys" warning,
and a resumed ViT continues from its fresh initialization.

`load_renamed_weights` acts only where that bites: when the checkpoint has keys the model's `load_state_dict`
would skip. It renames them with the model's own conversion mapping and loads them into the existing model (no
second model is built).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors weight files of a full-model checkpoint (one, or the shards of an index); [] for none."""
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, shard) for shard in shards]
    return []


def skipped_keys(model: torch.nn.Module, files: list[str]) -> set[str]:
    """The checkpoint keys that `model.load_state_dict` would not place (read from the file headers only)."""
    keys: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            keys.update(f.keys())
    return keys - set(model.state_dict())


def load_renamed_weights(model: torch.nn.Module, folder: str | None) -> bool:
    """Load the checkpoint in `folder` into `model` through the model's key renaming, if the stock loader would skip
    keys; True when it did. False (nothing changed) for no such keys, no safetensors weights, or not a
    `PreTrainedModel`, so the caller falls back to the stock loader.

    Raises a `ValueError` that lists the keys when the renaming cannot place every weight.
    """
    if folder is None or not isinstance(model, PreTrainedModel):
        return False
    files = checkpoint_files(folder)
    if not files or not skipped_keys(model, files):
        return False
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    state_dict = {}
    for path in files:
        for key, value in load_file(path, device="cpu").items():
            state_dict[rename_source_key(key, renamings, [])[0]] = value
    result = model.load_state_dict(state_dict, strict=False)
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state_dict if k in current}
    missing = [k for k in result.missing_keys if current[k].data_ptr() not in loaded]  # tied weights are not saved
    if result.unexpected_keys or missing:
        raise ValueError(
            f"The checkpoint in {folder} does not match the model after transformers' key renaming: "
            f"unexpected {sorted(result.unexpected_keys)[:5]}, missing {sorted(missing)[:5]}."
        )
    return True
