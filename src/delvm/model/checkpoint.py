"""Model checkpoints on disk: a folder with ``config.json`` and ``model.safetensors``.

``config.json`` holds ``{"format": "delvm", "model": {...ModelConfig...}, "tokenizer":
{"fingerprint": ...}}``. Every file is written under a temporary name and renamed into place, so
a killed writer never leaves a half-written checkpoint behind. Weights are safetensors: loading
never unpickles anything.

`load_model` is the one loader every command uses; it also accepts a training run's ``out``
folder (its latest checkpoint), and the published Hugging Face folders (LVM's ``llama``, DeLVM's
``internlm``) and `delvm export-hf` exports directly. `checkpoint_tokenizer` finds the tokenizer
a checkpoint was trained with, so a user need not name it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from delvm.devices import resolve_device
from delvm.errors import DelvmError
from delvm.fileio import atomic_write, read_json, write_json
from delvm.model.hf import is_hf_folder, load_hf_model
from delvm.model.transformer import ModelConfig, VisualLM
from delvm.train.state import SHARDS_DIR, read_sharded_tensors, resolve_checkpoint, run_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"  # an export's copy of its tokenizer (`delvm export-hf`)
FORMAT = "delvm"


def save_model(
    model: VisualLM, folder: str | Path, tokenizer_fingerprint: str | None = None
) -> Path:
    """Write ``model`` as a delvm checkpoint folder."""
    return save_weights(model.config, model.state_dict(), folder, tokenizer_fingerprint)


def save_weights(
    config: ModelConfig,
    state: dict[str, torch.Tensor] | None,
    folder: str | Path,
    tokenizer_fingerprint: str | None = None,
) -> Path:
    """Write a state dict of a model with ``config`` as a checkpoint (weights first, config last).

    Used directly by training, whose weights may be gathered from shards of a wrapped model;
    ``state`` None writes the config alone (a sharded training checkpoint keeps its weights in
    ``shards/``).
    """
    meta = {
        "format": FORMAT,
        "model": config.to_dict(),
        "tokenizer": {"fingerprint": tokenizer_fingerprint},
    }
    return write_weights_folder(folder, state, meta)


def write_weights_folder(
    folder: str | Path, state: dict[str, torch.Tensor] | None, meta: dict
) -> Path:
    """Weights (safetensors) first, ``config.json`` (``meta``) last, each written atomically: a
    folder whose config exists is complete. Shared by every checkpoint format of delvm."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
    write_json(folder / CONFIG_NAME, meta)
    return folder


def read_checkpoint_config(folder: str | Path) -> tuple[ModelConfig, dict]:
    """The model config and the whole metadata dict of a delvm checkpoint (or run) folder."""
    folder = resolve_checkpoint(folder)
    meta = read_json(folder / CONFIG_NAME)
    if meta.get("format") != FORMAT:
        raise DelvmError(f"{folder / CONFIG_NAME}: not a delvm checkpoint (no 'format': 'delvm')")
    return ModelConfig.from_dict(meta["model"]), meta


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> VisualLM:
    """Load a delvm checkpoint folder, a run folder (its latest checkpoint), or a Hugging Face
    llama / internlm folder, strictly. ``device``: a device, or ``auto`` (CUDA when present)."""
    folder, device = resolve_checkpoint(folder), resolve_device(device)
    if is_hf_folder(folder):
        return load_hf_model(folder).to(device)
    config, _ = read_checkpoint_config(folder)
    weights = folder / WEIGHTS_NAME
    if (folder / SHARDS_DIR).is_dir() and not weights.is_file():
        state, weights = read_sharded_tensors(folder), folder / SHARDS_DIR  # an FSDP run's
    elif not weights.is_file():
        raise DelvmError(f"{weights}: missing (the checkpoint folder is incomplete)")
    else:
        try:
            state = load_file(str(weights), device=str(device))
        except (SafetensorError, OSError) as err:
            raise DelvmError(
                f"{weights}: unreadable or truncated safetensors file ({err})"
            ) from None
    with torch.device("meta"):
        model = VisualLM(config)
    model.load_weights(state, weights)
    return model.to(device)


def tokenizer_fingerprint(folder: str | Path) -> str | None:
    """The fingerprint of the tokenizer a delvm checkpoint was trained with (None: not
    recorded, or a Hugging Face folder, which has no place for it)."""
    folder = resolve_checkpoint(folder)
    if is_hf_folder(folder):
        return None
    return read_checkpoint_config(folder)[1]["tokenizer"]["fingerprint"]


def checkpoint_tokenizer(folder: str | Path) -> Path | None:
    """The tokenizer folder of a checkpoint: an export's own copy (``tokenizer/``), else the
    ``tokenizer`` setting of the run that trained it, if that folder is still there."""
    folder = resolve_checkpoint(folder)
    if (folder / TOKENIZER_DIR / CONFIG_NAME).is_file():
        return folder / TOKENIZER_DIR
    recorded = (run_config(folder) or {}).get("tokenizer")
    if recorded and (Path(recorded) / CONFIG_NAME).is_file():
        return Path(recorded)
    return None
