"""Plain image folders (unlabelled, LAION-style): one single-image example per readable file."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

from delvm.data.example import Example, Skipped
from delvm.data.images import list_images
from delvm.data.sources.common import Source, load_or_skip


def _read_image(path: Path, task: str) -> Iterator[Example | Skipped]:
    image = load_or_skip(path)
    if isinstance(image, Skipped):
        yield image
    else:
        yield Example(task, [image], source=str(path), meta={"nearest": [False]})


def iter_image_folder(folder: str | Path, task: str = "unlabelled") -> Source:
    """Every image below `folder` (sorted), unreadable ones reported as Skipped."""
    return Source(list_images(folder), partial(_read_image, task=task))
