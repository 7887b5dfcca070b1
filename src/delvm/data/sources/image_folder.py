"""Plain image folders (unlabelled, LAION-style): one single-image example per readable file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from delvm.data.example import Example, Skipped
from delvm.data.images import list_images
from delvm.data.sources.common import load_or_skip


def iter_image_folder(folder: str | Path, task: str = "unlabelled") -> Iterator[Example | Skipped]:
    """Every image below `folder` (sorted), unreadable ones reported as Skipped."""
    for path in list_images(folder):
        image = load_or_skip(path)
        if isinstance(image, Skipped):
            yield image
        else:
            yield Example(task, [image], source=str(path), meta={"nearest": [False]})
