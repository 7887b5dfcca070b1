"""Data sources: each reads one annotation format users already have and gives, in a fixed
order, `Example`s (targets rendered as images) or `Skipped` records naming a bad file and why.

Each format function lists its files into a `Source` (iterate it for the examples; a build
decodes its units in worker processes, see `delvm.data.sources.common.Source`). `SOURCES` maps
the format name a build config uses to the function; the config's other keys are its keyword
arguments, e.g. {"format": "coco_keypoints", "json_path": ..., "image_dir": ...}. A whole source
that cannot be used (missing folder, a JSON that is not COCO) raises DelvmError when listed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import fields
from functools import partial

from delvm.data.example import Example
from delvm.data.sources.coco import iter_coco_keypoints
from delvm.data.sources.common import Source
from delvm.data.sources.image_folder import iter_image_folder
from delvm.data.sources.mpii import iter_mpii
from delvm.data.sources.paired import iter_paired_folders
from delvm.data.sources.pascal import iter_pascal5i
from delvm.data.sources.sa1b import iter_sa1b
from delvm.data.sources.video import iter_video
from delvm.errors import DelvmError


def _read_toyworld(unit: tuple[str, str, int], config) -> Iterator[Example]:
    from delvm.data.toyworld import toyworld_example

    _, task, index = unit
    yield toyworld_example(config, task, index)


def iter_toyworld_source(**settings) -> Source:
    """The toy world as a source: keyword arguments are ToyWorldConfig fields."""
    # Imported here: the toy world writes the paired layout, so it imports this package.
    from delvm.data.toyworld import ToyWorldConfig

    known = [f.name for f in fields(ToyWorldConfig)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise DelvmError(f"toyworld source: unknown settings {unknown}; known: {known}")
    config = ToyWorldConfig(**settings)
    units = [
        (f"toyworld/{task}/{index:06d}", task, index)
        for task, count in config.counts().items()
        for index in range(count)
    ]
    return Source(units, partial(_read_toyworld, config=config))


SOURCES: dict[str, Callable[..., Source]] = {
    "paired": iter_paired_folders,
    "coco_keypoints": iter_coco_keypoints,
    "mpii": iter_mpii,
    "sa1b": iter_sa1b,
    "pascal5i": iter_pascal5i,
    "video": iter_video,
    "image_folder": iter_image_folder,
    "toyworld": iter_toyworld_source,
}


def open_source(config: dict) -> Source:
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
    "Source",
    "open_source",
    "iter_coco_keypoints",
    "iter_image_folder",
    "iter_mpii",
    "iter_paired_folders",
    "iter_pascal5i",
    "iter_sa1b",
    "iter_toyworld_source",
    "iter_video",
]
