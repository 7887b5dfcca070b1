"""Model checkpoints on disk: a folder with ``config.json`` and ``model.safetensors``.

``config.json`` holds ``{"format": "delvm", "model": {...ModelConfig...}, "tokenizer":
{"fingerprint": ...}}``. Every file is written under a temporary name and renamed into place, so
a killed writer never leaves a half-written checkpoint behind. Weights are safetensors: loading
never unpickles anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from delvm.errors import DelvmError
from delvm.model import ModelConfig, VisualLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "delvm"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename tmp onto ``path`` (atomic on POSIX file systems)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DelvmError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise DelvmError(f"{path}: not valid JSON ({err})") from None


def save_model(
    model: VisualLM, folder: str | Path, tokenizer_fingerprint: str | None = None
) -> Path:
    """Write ``model`` as a delvm checkpoint folder (weights first, config last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp)))
    meta = {
        "format": FORMAT,
        "model": model.config.to_dict(),
        "tokenizer": {"fingerprint": tokenizer_fingerprint},
    }
    write_json(folder / CONFIG_NAME, meta)
    return folder


def read_checkpoint_config(folder: str | Path) -> tuple[ModelConfig, dict]:
    """The model config and the whole metadata dict of a delvm checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DelvmError(f"{folder}: no such checkpoint folder")
    meta = read_json(folder / CONFIG_NAME)
    if meta.get("format") != FORMAT:
        hint = (
            "it looks like a Hugging Face folder: run `delvm import-hf` on it first"
            if "model_type" in meta
            else "expected a folder written by delvm"
        )
        raise DelvmError(f"{folder / CONFIG_NAME}: not a delvm checkpoint ({hint})")
    return ModelConfig.from_dict(meta["model"]), meta


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> VisualLM:
    """Load a delvm checkpoint folder, with strict key and shape checks."""
    folder = Path(folder)
    config, _ = read_checkpoint_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise DelvmError(f"{weights}: missing (the checkpoint folder is incomplete)")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as err:
        raise DelvmError(f"{weights}: unreadable or truncated safetensors file ({err})") from None
    with torch.device("meta"):
        model = VisualLM(config)
    load_state_strict(model, state, weights)
    return model.to(device)


def load_state_strict(model: VisualLM, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``model`` (possibly on the meta device); any mismatch is an error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DelvmError(
            f"{source}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); the config.json beside it must be the one they were "
            "saved with"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise DelvmError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, config expects "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rotary()  # built on the meta device above; derived, so not in the file
