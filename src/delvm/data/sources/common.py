"""Helpers every source shares: reading an image or reporting why not, per-example seeds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from delvm.data.example import Skipped
from delvm.data.images import load_image
from delvm.errors import DelvmError


def load_or_skip(path: Path) -> np.ndarray | Skipped:
    """The image as RGB uint8, or a `Skipped` with `load_image`'s one-line reason."""
    try:
        return load_image(path)
    except DelvmError as err:
        reason = str(err).removeprefix(f"{path}: ")
        return Skipped(str(path), reason)


def example_seed(seed: int, name: str) -> int:
    """A seed for one example from its name, so it does not depend on iteration order."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
