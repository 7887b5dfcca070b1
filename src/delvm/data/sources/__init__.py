"""Data sources: each reads one annotation format users already have and yields, in a fixed
order, `Example`s (targets rendered as images) or `Skipped` records naming a bad file and why.

`SOURCES` maps the format name a build config uses to the function; the config's other keys are
its keyword arguments, e.g. {"format": "coco_keypoints", "json_path": ..., "image_dir": ...}.
A whole source that cannot be used (missing folder, a JSON that is not COCO) raises DelvmError.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import fields

from delvm.data.example import Example, Skipped
from delvm.data.sources.coco import iter_coco_keypoints
from delvm.data.sources.image_folder import iter_image_folder
from delvm.data.sources.paired import iter_paired_folders
from delvm.data.sources.pascal import iter_pascal5i
from delvm.data.sources.sa1b import iter_sa1b
from delvm.data.sources.video import iter_video
from delvm.errors import DelvmError


def iter_toyworld_source(**settings) -> Iterator[Example]:
    """The toy world as a source: keyword arguments are ToyWorldConfig fields."""
    # Imported here: the toy world writes the paired layout, so it imports this package.
    from delvm.data.toyworld import ToyWorldConfig, iter_toyworld

    known = [f.name for f in fields(ToyWorldConfig)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise DelvmError(f"toyworld source: unknown settings {unknown}; known: {known}")
    return iter_toyworld(ToyWorldConfig(**settings))


SOURCES: dict[str, Callable[..., Iterator[Example | Skipped]]] = {
    "paired": iter_paired_folders,
    "coco_keypoints": iter_coco_keypoints,
    "sa1b": iter_sa1b,
    "pascal5i": iter_pascal5i,
    "video": iter_video,
    "image_folder": iter_image_folder,
    "toyworld": iter_toyworld_source,
}


def open_source(config: dict) -> Iterator[Example | Skipped]:
    """The source a build config describes: {"format": NAME, **its keyword arguments}."""
    settings = dict(config)
    name = settings.pop("format", None)
    if name not in SOURCES:
        raise DelvmError(f"source format {name!r}: use one of {', '.join(SOURCES)}")
    function = SOURCES[name]
    try:
        inspect.signature(function).bind(**settings)
    except TypeError as err:
        raise DelvmError(
            f"{name} source: {err} (see delvm.data.sources.{function.__name__})"
        ) from None
    return function(**settings)


__all__ = [
    "SOURCES",
    "open_source",
    "iter_coco_keypoints",
    "iter_image_folder",
    "iter_paired_folders",
    "iter_pascal5i",
    "iter_sa1b",
    "iter_toyworld_source",
    "iter_video",
]
