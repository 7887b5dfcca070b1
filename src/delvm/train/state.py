"""Training checkpoints: model weights (safetensors) + training state, written atomically.

Layout: ``OUT/checkpoints/step-000100/`` holding a normal delvm model checkpoint (config.json,
model.safetensors) and ``training_state.pt`` (optimizer, step, RNG, data position, the run's
config). A checkpoint is written into ``step-000100.tmp`` and renamed when complete, so a run
killed while writing leaves the previous checkpoint as the latest; then ``OUT/checkpoints/latest``
(a one-line text file) names it, so every verb that takes a checkpoint also takes ``OUT``.
Training state is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from delvm.errors import DelvmError
from delvm.fileio import atomic_write

STATE_NAME = "training_state.pt"
LATEST_NAME = "latest"  # OUT/checkpoints/latest: the name of the newest finished checkpoint
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (anything with a ``config.json``), or a run's ``out``: its latest."""
    path = Path(path)
    if not path.is_dir():
        raise DelvmError(f"{path}: no such checkpoint or run folder")
    if (path / "config.json").is_file():
        return path
    latest = path / "checkpoints" / LATEST_NAME
    if latest.is_file():
        named = latest.parent / latest.read_text().strip()
        if (named / STATE_NAME).is_file():
            return named
    found = checkpoint_dirs(path)  # a run written before `latest` existed, or its named one gone
    if not found:
        raise DelvmError(
            f"{path}: neither a checkpoint folder (no config.json) nor a run folder with "
            "checkpoints/; pass a checkpoint or the `out` folder of a run"
        )
    return found[-1]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict,
    is_main: bool,
    keep: int,
    write_weights: Callable[[dict[str, torch.Tensor], Path], None],
) -> Path | None:
    """Gather full state on every rank (collective), write on rank 0, prune to ``keep``.

    ``write_weights(state, folder)`` writes the model folder (the LVM's: `save_weights`; the
    classifier's: its own format); the training state goes beside it.
    """
    # Imported here: it takes seconds, and readers of a run folder need none of it.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not is_main:
        return None
    root = Path(out) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(model_state, tmp)
    state = {"step": step, "optimizer": optim_state, "rng": rng_state(), **extra}
    torch.save(state, tmp / STATE_NAME)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write(root / LATEST_NAME, lambda path: path.write_text(final.name + "\n"))
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_training_state(folder: Path, mmap: bool = False) -> dict:
    """The training state of a checkpoint (step, optimizer, RNG, data position, config);
    ``mmap`` maps its tensors rather than reading them (for a look at the config alone)."""
    try:
        return torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unreadable state is the same user problem
        raise DelvmError(f"{folder / STATE_NAME}: unreadable training state ({err})") from None


def run_config(checkpoint: str | Path) -> dict | None:
    """The config of the run that wrote a training checkpoint (as `TrainConfig.to_dict`); None
    for a model folder without training state (an export, an import, `save_model`)."""
    folder = Path(checkpoint)
    if not (folder / STATE_NAME).is_file():
        return None
    return read_training_state(folder, mmap=True).get("config")


def restore_training_state(
    folder: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load weights, optimizer and RNG into a (possibly wrapped) model, as of ``state``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights = load_file(str(folder / "model.safetensors"))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    set_rng_state(state["rng"])


class StopSignals:
    """SIGTERM and SIGINT while a training loop runs: recorded, not raised, so the loop can save a
    checkpoint at the end of its step and return; rerunning the command resumes from it.

        with StopSignals() as stop:
            for step in ...:
                ...
                if stop.received is not None:
                    save(); break
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self._previous = {
            s: signal.signal(s, self._record) for s in (signal.SIGTERM, signal.SIGINT)
        }
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame) -> None:
        self.received = signum
