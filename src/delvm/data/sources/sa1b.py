"""SA-1B (Segment Anything): `sa_N.jpg` + `sa_N.json` -> (photo, instances in random colours).

Each JSON holds {"image": {"file_name", "width", "height", ...}, "annotations": [{"segmentation":
{"size": [h, w], "counts": COCO RLE}, "area", ...}]}. Masks are decoded one at a time with
pycocotools (an SA-1B image has ~100 masks of ~3 MP each) and painted largest first, each in a
colour seeded by the file name, so a rebuild gives the same colours in any order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from delvm.data.example import Example, Skipped
from delvm.data.render import render_instances
from delvm.data.sources.common import Source, example_seed, load_or_skip
from delvm.errors import DelvmError
from delvm.fileio import read_json


class _LazyMasks(Sequence):
    """COCO RLEs decoded on indexing, so only one full-size mask is in memory at a time."""

    def __init__(self, rles: list[dict]):
        self.rles = rles

    def __len__(self) -> int:
        return len(self.rles)

    def __getitem__(self, index: int) -> np.ndarray:
        with warnings.catch_warnings():
            # pycocotools 2.0.x trips numpy 2's `copy=` deprecation inside decode; harmless.
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(self.rles[index]).view(bool)  # 0/1 bytes: no copy


def rle_runs(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the format of pycocotools' rleFrString).

    Needed to validate before decoding: pycocotools leaves the pixels after short runs
    uninitialised instead of failing, so a truncated string would give a garbage mask.
    """
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64:
            raise ValueError(f"character {char!r} cannot appear in a COCO RLE string")
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:  # more 5-bit groups follow
            continue
        if code & 0x10:  # negative: sign-extend
            value -= 1 << shift
        if len(runs) > 2:  # runs after the first two are stored as deltas
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    if shift:
        raise ValueError("the RLE string ends inside a number")
    return runs


def _rles(annotations: list, height: int, width: int) -> list[dict] | str:
    """The annotations as pycocotools RLEs, or the reason they are unusable."""
    rles = []
    for index, ann in enumerate(annotations):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            return f"annotation {index} has no RLE 'segmentation' with 'size' and 'counts'"
        if not isinstance(seg["counts"], str | list):
            return f"annotation {index} RLE 'counts' is neither a string nor a list"
        if list(seg["size"]) != [height, width]:
            return f"annotation {index} mask is {seg['size']}, image is [{height}, {width}]"
        counts = seg["counts"]
        runs = counts if isinstance(counts, list) else rle_runs(counts)
        if any(r < 0 for r in runs) or sum(runs) != height * width:
            return f"annotation {index} RLE covers {sum(runs)} pixels, not {height * width}"
        if isinstance(counts, list):  # uncompressed RLE
            rles.append(mask_utils.frPyObjects(seg, height, width))
        else:
            rles.append({"size": [height, width], "counts": counts})
    return rles


def _example(json_path: Path, task: str, seed: int) -> Example | Skipped:
    try:
        data = read_json(json_path)
    except DelvmError as err:
        return Skipped(str(json_path), str(err).removeprefix(f"{json_path}: "))
    info = data.get("image") if isinstance(data, dict) else None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(info, dict) or not isinstance(annotations, list):
        return Skipped(str(json_path), "needs an 'image' record and an 'annotations' list")
    if not annotations:
        return Skipped(str(json_path), "no masks")
    name = info.get("file_name", json_path.with_suffix(".jpg").name)
    if not isinstance(name, str):
        return Skipped(str(json_path), f"'file_name' {name!r} is not a file name")
    image_path = json_path.parent / name
    image = load_or_skip(image_path)
    if isinstance(image, Skipped):
        return image
    height, width = image.shape[:2]
    try:
        rles = _rles(annotations, height, width)
        if isinstance(rles, str):
            return Skipped(str(json_path), rles)
        areas, boxes = mask_utils.area(rles), mask_utils.toBbox(rles)
        colours_seed = example_seed(seed, json_path.name)
        target = render_instances(_LazyMasks(rles), colours_seed, areas, boxes)
    except (ValueError, TypeError) as err:
        return Skipped(str(json_path), f"invalid RLE mask ({err})")
    return Example(
        task,
        [image, target],
        source=str(image_path),
        meta={"nearest": [False, True], "instances": len(rles)},
    )


def _read_annotation(json_path: Path, task: str, seed: int) -> Iterator[Example | Skipped]:
    yield _example(json_path, task, seed)


def iter_sa1b(folder: str | Path, task: str = "segmentation", seed: int = 0) -> Source:
    """(photo, instance map) examples from an SA-1B folder of image + JSON files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DelvmError(f"{folder}: no such folder (SA-1B source: check `folder`)")
    json_paths = sorted(folder.glob("*.json"))
    if not json_paths:
        raise DelvmError(f"{folder}: no SA-1B annotation files (expected sa_N.jpg + sa_N.json)")
    annotated = {p.stem for p in json_paths}
    orphans = [p for p in folder.glob("*.jpg") if p.stem not in annotated]
    units = [
        Skipped(str(path), f"no annotation file {path.stem}.json beside it")
        if path.suffix == ".jpg"
        else path
        for path in sorted(json_paths + orphans)
    ]
    return Source(units, partial(_read_annotation, task=task, seed=seed))
