"""Training checkpoints: model weights (safetensors) + training state, written atomically.

Layout: ``OUT/checkpoints/step-000100/`` holding a normal delvm model checkpoint (config.json,
model.safetensors) and ``training_state.pt`` (optimizer, step, RNG, data position, the run's
config). A checkpoint is written into ``step-000100.tmp`` and renamed when complete, so a run
killed while writing leaves the previous checkpoint as the latest; then ``OUT/checkpoints/latest``
(a one-line text file) names it, so every verb that takes a checkpoint also takes ``OUT``.
Training state is loaded with ``weights_only=True``.

A *sharded* checkpoint (FSDP runs: ``checkpoint_format``) has no ``model.safetensors``: every rank
writes its own shards of the weights and of the optimizer state into ``shards/`` with
``torch.distributed.checkpoint`` (one safetensors file per rank, each tensor's offsets in the
file's JSON header), so nothing is gathered to one rank. Any number of ranks reads it back, each
its own slices (`restore_training_state`), and one process reads the whole model
(`read_sharded_tensors`, as `load_model` and `delvm export-hf` do). Its reader takes everything
from the safetensors headers: loading unpickles nothing (DCP's default ``.metadata`` is a pickle).
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from delvm.errors import DelvmError
from delvm.fileio import atomic_write

STATE_NAME = "training_state.pt"
SHARDS_DIR = "shards"  # a sharded checkpoint's model and optimizer tensors, a file per rank
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
    write_weights: Callable[[dict[str, torch.Tensor] | None, Path], None],
    sharded: bool = False,
) -> Path | None:
    """Write a checkpoint (collective: every rank calls it), prune to ``keep``.

    Full: the whole model and optimizer state are gathered on every rank and rank 0 writes them.
    Sharded: every rank writes its own shards into ``shards/`` (`SHARDS_DIR`). In both,
    ``write_weights(state, folder)`` writes the model folder on rank 0 (the LVM's: `save_weights`;
    the classifier's: its own format; ``state`` None: the config alone, the weights are in
    ``shards/``); the training state goes beside it.
    """
    # Imported here: it takes seconds, and readers of a run folder need none of it.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    root = Path(out) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if sharded:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()  # every rank writes into the folder rank 0 has just emptied
        model_state = get_model_state_dict(model)
        optim_state = get_optimizer_state_dict(model, optimizer)
        writer = HuggingFaceStorageWriter(str(tmp / SHARDS_DIR), save_distributed=True)
        dcp.save({"model": model_state, "optim": optim_state["state"]}, storage_writer=writer)
        model_state, optim_state = None, {"param_groups": optim_state["param_groups"]}
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not is_main:
        return None
    if not sharded:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    write_weights(model_state, tmp)
    state = {
        "step": step,
        "optimizer": optim_state,
        "sharded": sharded,
        "rng": rng_state(),
        **extra,
    }
    torch.save(state, tmp / STATE_NAME)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write(root / LATEST_NAME, lambda path: path.write_text(final.name + "\n"))
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


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
    """Load weights, optimizer and RNG into a (possibly wrapped) model, as of ``state``; any
    number of ranks reads either format (each rank its own slices of a sharded one)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if state.get("sharded"):
        # This run's own layout (sharded by its ranks, or whole in one process), filled in place.
        weights = get_model_state_dict(model)
        optim_state = get_optimizer_state_dict(model, optimizer)
        single = not torch.distributed.is_initialized()
        _load_shards({"model": weights, "optim": optim_state["state"]}, folder, single)
        optim_state["param_groups"] = state["optimizer"]["param_groups"]
        options = StateDictOptions()
    else:
        weights = load_file(str(folder / "model.safetensors"))
        optim_state = state["optimizer"]
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    set_rng_state(state["rng"])


def read_sharded_tensors(folder: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint whose name starts with ``prefix``, whole, in this
    process alone (``model.``: the weights, named as in the model; ``optim.``: optimizer state)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    shards = Path(folder) / SHARDS_DIR
    try:
        shapes = HuggingFaceStorageReader(str(shards)).read_metadata().state_dict_metadata
    except Exception as err:  # noqa: BLE001 - any unreadable shard is the same user problem
        raise DelvmError(f"{shards}: unreadable checkpoint shards ({err})") from None
    tensors = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in shapes.items()
        if name.startswith(prefix)
    }
    if not tensors:
        raise DelvmError(f"{shards}: no {prefix}* tensors in the checkpoint shards")
    _load_shards(tensors, Path(folder), single_process=True)
    return {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}


def _load_shards(tensors: dict, folder: Path, single_process: bool) -> None:
    """Fill ``tensors`` (nested dicts, sharded or whole) in place from ``folder/shards``; every
    rank calls it unless ``single_process``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(folder / SHARDS_DIR))
    with warnings.catch_warnings():
        # DCP warns when one process reads alone; here that is what is asked for.
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        try:
            dcp.load(tensors, storage_reader=reader, no_dist=single_process)
        except Exception as err:  # noqa: BLE001 - as above
            raise DelvmError(
                f"{folder / SHARDS_DIR}: unreadable checkpoint shards ({err}); resume from an "
                "earlier checkpoint by deleting this one"
            ) from None


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
