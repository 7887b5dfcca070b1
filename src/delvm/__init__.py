"""delvm: data-efficient autoregressive Large Vision Models (DeLVM / LVM) in PyTorch.

The Python API in three lines (a run folder, a checkpoint, or a `delvm export-hf` export):

    import delvm
    prompter = delvm.load_prompter("run")  # a run folder, a checkpoint or an export
    answers = prompter([("in.png", "out.png")], ["query.png"])  # one RGB uint8 array per query

The names below are imported on first use, so ``import delvm`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_prompter": "delvm.inference.prompting",  # checkpoint + tokenizer -> VisualPrompter
    "VisualPrompter": "delvm.inference.prompting",
    "SamplingConfig": "delvm.inference.generate",  # greedy by default; temperature, top-k/p
    "load_model": "delvm.model.checkpoint",  # a run, checkpoint or Hugging Face folder
    "VisualLM": "delvm.model.transformer",
    "load_tokenizer": "delvm.tokenizer",  # a VQGAN folder
}
__all__ = [
    "SamplingConfig",
    "VisualLM",
    "VisualPrompter",
    "load_model",
    "load_prompter",
    "load_tokenizer",
]  # = _API's keys (tests/test_api.py checks)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'delvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
