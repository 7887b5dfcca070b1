"""What every source shares: the `Source` a build splits into work, reading an image or reporting
why not, per-example seeds."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from delvm.data.example import Example, Skipped
from delvm.data.images import load_image
from delvm.errors import DelvmError


@dataclass(frozen=True)
class Source:
    """A source listed into units of work: iterate it for its examples in order.

    Listing (the format function that returns this) is cheap: folder listings and index files,
    and the problems found without decoding (an image without its annotation) as `Skipped`
    units. `read(unit)` decodes one unit (an image file, an annotation record, a video) into its
    `Example`s and `Skipped`s, always the same ones in the same order. A build lists every source
    in every rank and reads only its own units, in worker processes: units and `read` pickle
    (module-level functions, `functools.partial` of them). A unit is a path, or a tuple whose
    first element is the path it reads (the report names it if reading fails unexpectedly).
    """

    units: list[Any]
    read: Callable[[Any], Iterable[Example | Skipped]]

    def read_unit(self, unit: Any) -> Iterator[Example | Skipped]:
        """One unit's examples and skipped records, in order (a Skipped unit is itself)."""
        if isinstance(unit, Skipped):
            yield unit
        else:
            yield from self.read(unit)

    def __iter__(self) -> Iterator[Example | Skipped]:
        for unit in self.units:
            yield from self.read_unit(unit)


def unit_path(unit: Any) -> str:
    """The file a unit reads (see `Source`)."""
    if isinstance(unit, Skipped):
        return unit.source
    return str(unit[0] if isinstance(unit, tuple) else unit)


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
