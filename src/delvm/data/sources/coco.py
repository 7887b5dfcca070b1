"""COCO keypoints (`person_keypoints_*.json` + its image folder) -> (photo, skeleton map) pairs.

Per image (default): every annotated person of the image drawn on one skeleton map. Per person
(`per_person=True`): one example per person, the photo cropped to a square around the person's
box (enlarged by `box_scale`, black beyond the image), and only that person drawn, the top-down
setting `decode_skeleton` reads back. Crowd annotations and persons with fewer than
`min_keypoints` labelled joints are left out (a filter, not an error).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from delvm.data.example import Example, Skipped
from delvm.data.render import COCO_JOINTS, render_skeleton
from delvm.data.sources.common import Source, load_or_skip
from delvm.errors import DelvmError
from delvm.fileio import read_json


def _person_category(data: dict, json_path: Path) -> int:
    for category in data.get("categories") or []:
        if isinstance(category, dict) and len(category.get("keypoints") or []) == len(COCO_JOINTS):
            return category.get("id")
    raise DelvmError(
        f"{json_path}: no category with the 17 COCO keypoints; use a person_keypoints_*.json file"
    )


def _is_id(value) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _persons(data: dict, json_path: Path, category: int, min_keypoints: int):
    """Usable annotations grouped by image id, plus Skipped for malformed ones."""
    by_image, skipped = defaultdict(list), []
    for index, ann in enumerate(data["annotations"]):
        where = f"{json_path}#annotation={ann.get('id', index) if isinstance(ann, dict) else index}"
        if not isinstance(ann, dict) or "image_id" not in ann or "keypoints" not in ann:
            skipped.append(Skipped(where, "annotation without 'image_id' or 'keypoints'"))
            continue
        if not _is_id(ann["image_id"]):
            skipped.append(
                Skipped(where, f"'image_id' {ann['image_id']!r}: not a number or string")
            )
            continue
        if ann.get("category_id", category) != category or ann.get("iscrowd", 0):
            continue
        try:
            keypoints = np.asarray(ann["keypoints"], dtype=np.float64).reshape(len(COCO_JOINTS), 3)
        except (TypeError, ValueError):
            skipped.append(Skipped(where, "'keypoints' is not 17 (x, y, v) triples"))
            continue
        if np.count_nonzero(keypoints[:, 2] > 0) >= min_keypoints:
            by_image[ann["image_id"]].append((ann, keypoints))
    return by_image, skipped


def _box(ann: dict, keypoints: np.ndarray) -> tuple[float, float, float, float]:
    """The person's box (x, y, w, h): COCO's `bbox`, else the labelled joints' extent."""
    bbox = ann.get("bbox")
    numbers = isinstance(bbox, list) and all(isinstance(v, int | float) for v in bbox)
    if numbers and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0:
        return tuple(float(v) for v in bbox)
    labelled = keypoints[keypoints[:, 2] > 0, :2]
    (x0, y0), (x1, y1) = labelled.min(axis=0), labelled.max(axis=0)
    return x0, y0, max(x1 - x0, 1.0), max(y1 - y0, 1.0)


def _crop_square(image: np.ndarray, left: int, top: int, side: int) -> np.ndarray:
    """image[top:top+side, left:left+side], black where the square leaves the image."""
    out = np.zeros((side, side, 3), dtype=np.uint8)
    height, width = image.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, height), min(left + side, width)
    if y0 < y1 and x0 < x1:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


def _person_example(task, image, path, ann, keypoints, box_scale) -> Example:
    x, y, w, h = _box(ann, keypoints)
    side = max(2, round(max(w, h) * box_scale))
    left, top = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    moved = keypoints.copy()
    moved[:, 0] -= left
    moved[:, 1] -= top
    inside = (moved[:, :2] >= 0).all(axis=1) & (moved[:, :2] < side).all(axis=1)
    moved[~inside | (moved[:, 2] == 0)] = 0
    return Example(
        task,
        [_crop_square(image, left, top, side), render_skeleton(moved, side, side)],
        source=f"{path}#person={ann.get('id')}",
        keypoints=moved[None],
        meta={"nearest": [False, True], "skeleton": 1, "box": [left, top, side]},
    )


def iter_coco_keypoints(
    json_path: str | Path,
    image_dir: str | Path,
    task: str = "pose",
    per_person: bool = False,
    min_keypoints: int = 1,
    box_scale: float = 1.25,
) -> Source:
    """(photo, skeleton map) examples from a COCO keypoints file and its images."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not image_dir.is_dir():
        raise DelvmError(f"{image_dir}: no such image folder (COCO source: check `image_dir`)")
    data = read_json(json_path)
    return coco_keypoints_source(
        data, json_path, image_dir, task, per_person, min_keypoints, box_scale
    )


def coco_keypoints_source(
    data: dict,
    json_path: Path,
    image_dir: Path,
    task: str = "pose",
    per_person: bool = False,
    min_keypoints: int = 1,
    box_scale: float = 1.25,
) -> Source:
    """The source of COCO keypoints ``data``: read from ``json_path``, or converted from another
    format to COCO's (`delvm.data.sources.mpii`)."""
    lists = isinstance(data, dict) and all(
        isinstance(data.get(key), list) for key in ("images", "annotations")
    )
    if not lists:
        raise DelvmError(f"{json_path}: not a COCO file (needs 'images' and 'annotations' lists)")
    by_image, units = _persons(data, json_path, _person_category(data, json_path), min_keypoints)
    known = {r.get("id") for r in data["images"] if isinstance(r, dict) and _is_id(r.get("id"))}
    for image_id, persons in by_image.items():  # annotation order: a build's report is stable
        if image_id not in known:
            for ann, _ in persons:
                where = f"{json_path}#annotation={ann.get('id')}"
                units.append(Skipped(where, f"image_id {image_id!r} is not in the file's 'images'"))
    for index, record in enumerate(data["images"]):
        ok = isinstance(record, dict) and isinstance(record.get("file_name"), str)
        if not ok or not _is_id(record.get("id")):
            units.append(
                Skipped(f"{json_path}#image={index}", "image record without 'id' or 'file_name'")
            )
            continue
        persons = by_image.get(record["id"])
        if persons:
            # Only what reading needs, so a unit pickles small (annotations carry polygons).
            size = {k: record[k] for k in ("id", "height", "width") if k in record}
            slim = [({k: ann[k] for k in ("id", "bbox") if k in ann}, kps) for ann, kps in persons]
            units.append((image_dir / record["file_name"], size, slim))
    read = partial(_read_image, task=task, per_person=per_person, box_scale=box_scale)
    return Source(units, read)


def _read_image(unit, task: str, per_person: bool, box_scale: float) -> Iterator[Example | Skipped]:
    """One image record's example (or one per person)."""
    path, record, persons = unit
    image = load_or_skip(path)
    if isinstance(image, Skipped):
        yield image
        return
    expected = (record.get("height", image.shape[0]), record.get("width", image.shape[1]))
    if image.shape[:2] != tuple(expected):
        yield Skipped(
            str(path),
            f"image is {image.shape[1]}x{image.shape[0]} but the JSON says "
            f"{expected[1]}x{expected[0]}; keypoints would not line up",
        )
        return
    if per_person:
        for ann, keypoints in persons:
            yield _person_example(task, image, path, ann, keypoints, box_scale)
        return
    keypoints = np.stack([k for _, k in persons])
    height, width = image.shape[:2]
    yield Example(
        task,
        [image, render_skeleton(keypoints, height, width)],
        source=str(path),
        keypoints=keypoints,
        meta={"nearest": [False, True], "skeleton": 1, "image_id": record["id"]},
    )
