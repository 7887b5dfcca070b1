"""Paired folders: an input image and its target image matched by file name.

Layouts it reads (every `INPUT_DIR` folder under the root with a `TARGET_DIR` folder beside it):

    Rain13K (MPRNet layout)      ROOT/input/NAME.jpg        ROOT/target/NAME.jpg
    GoPro (input_dir="blur",     ROOT/GOPR0372_07_00/blur/000047.png
           target_dir="sharp")   ROOT/GOPR0372_07_00/sharp/000047.png
    delvm data toyworld          OUT/pose/input/pose_000000.png  OUT/pose/target/...

Files pair up by their path below the two folders without the suffix, so a.jpg pairs with a.png.
An optional keypoints file (written by the toy world, format below) attaches COCO keypoints to
each pair by that same name, and makes the target that skeleton map (augmentation redraws it):

    {"format": "delvm-keypoints", "joints": [17 COCO names],
     "keypoints": {"NAME": [[[x, y, v] * 17] per person]}}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from delvm.data.example import Example, Skipped
from delvm.data.images import IMAGE_SUFFIXES
from delvm.data.render import COCO_JOINTS
from delvm.data.sources.common import Source, load_or_skip
from delvm.errors import DelvmError
from delvm.fileio import read_json, write_json

KEYPOINTS_FORMAT = "delvm-keypoints"


def write_keypoints_file(path: Path, keypoints: dict[str, np.ndarray]) -> None:
    """Write {name: [persons, 17, 3]} in the format `iter_paired_folders` reads."""
    write_json(
        path,
        {
            "format": KEYPOINTS_FORMAT,
            "joints": list(COCO_JOINTS),
            "keypoints": {name: np.asarray(k).round(3).tolist() for name, k in keypoints.items()},
        },
    )


def read_keypoints_file(path: Path) -> dict[str, np.ndarray]:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != KEYPOINTS_FORMAT:
        raise DelvmError(
            f"{path}: not a {KEYPOINTS_FORMAT} file (written by `delvm data toyworld`)"
        )
    out = {}
    for name, value in data.get("keypoints", {}).items():
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            array = np.zeros(0)
        if array.ndim != 3 or array.shape[1:] != (len(COCO_JOINTS), 3):
            raise DelvmError(f"{path}: keypoints of {name!r} are not [persons, 17, 3]; rewrite it")
        out[name] = array
    return out


def _by_name(folder: Path) -> dict[str, list[Path]]:
    """Image files below `folder` keyed by relative path without suffix."""
    files = defaultdict(list)
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            files[path.relative_to(folder).with_suffix("").as_posix()].append(path)
    return files


def _pair_folders(root: Path, input_dir: str, target_dir: str) -> list[tuple[Path, Path]]:
    inputs = [root] if root.name == input_dir else []
    inputs += sorted(root.rglob(input_dir))
    pairs = [(d, d.parent / target_dir) for d in inputs]
    return [(i, t) for i, t in pairs if i.is_dir() and t.is_dir()]


def iter_paired_folders(
    root: str | Path,
    task: str = "derain",
    input_dir: str = "input",
    target_dir: str = "target",
    target_nearest: bool = False,
    keypoints_file: str | Path | None = None,
) -> Source:
    """(input, target) examples from every input_dir/target_dir folder pair under `root`.

    `target_nearest`: the targets are rendered codes (masks, skeletons), resampled with nearest.
    """
    root = Path(root)
    if not root.is_dir():
        raise DelvmError(f"{root}: no such folder (paired source: check `root`)")
    folders = _pair_folders(root, input_dir, target_dir)
    if not folders:
        raise DelvmError(
            f"{root}: no '{input_dir}' folder with a '{target_dir}' folder beside it; set "
            "input_dir/target_dir to your layout (e.g. blur/sharp for GoPro)"
        )
    keypoints = read_keypoints_file(Path(keypoints_file)) if keypoints_file else None
    units = []
    for input_folder, target_folder in folders:
        units.extend(_pairs(input_folder, target_folder, keypoints))
    return Source(units, partial(_read_pair, task=task, target_nearest=target_nearest))


def _pairs(input_folder, target_folder, keypoints) -> list[tuple | Skipped]:
    """(input path, target path, keypoints or None) per matched name, Skipped for the rest."""
    inputs, targets = _by_name(input_folder), _by_name(target_folder)
    units = []
    for name in sorted(inputs.keys() | targets.keys()):
        found_in, found_tgt = inputs.get(name, []), targets.get(name, [])
        if len(found_in) > 1 or len(found_tgt) > 1:
            names = ", ".join(p.name for p in found_in + found_tgt)
            first = (found_in or found_tgt)[0]
            units.append(Skipped(str(first), f"several files named {name} ({names}); keep one"))
        elif not found_tgt:
            units.append(Skipped(str(found_in[0]), f"no matching target in {target_folder}"))
        elif not found_in:
            units.append(Skipped(str(found_tgt[0]), f"no matching input in {input_folder}"))
        elif keypoints is not None and name not in keypoints:
            reason = f"no keypoints for {name!r} in the keypoints file"
            units.append(Skipped(str(found_in[0]), reason))
        else:
            pose = None if keypoints is None else keypoints[name]
            units.append((found_in[0], found_tgt[0], pose))
    return units


def _read_pair(
    unit: tuple[Path, Path, np.ndarray | None], task: str, target_nearest: bool
) -> Iterator[Example | Skipped]:
    source, target_path, pose = unit
    image, target = load_or_skip(source), load_or_skip(target_path)
    if isinstance(image, Skipped) or isinstance(target, Skipped):
        yield image if isinstance(image, Skipped) else target
        return
    if image.shape != target.shape:
        yield Skipped(
            str(source),
            f"input is {image.shape[1]}x{image.shape[0]} but target {target_path.name} is "
            f"{target.shape[1]}x{target.shape[0]}; pairs must be the same size",
        )
        return
    yield Example(
        task,
        [image, target],
        source=str(source),
        keypoints=pose,
        meta={
            "nearest": [False, target_nearest or pose is not None],
            "target": str(target_path),
            **({"skeleton": 1} if pose is not None else {}),
        },
    )
