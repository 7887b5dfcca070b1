"""MPII Human Pose (the paper's pose validation set) -> (photo, skeleton map) pairs.

Reads the JSON form of MPII's annotations that HRNet and mmpose convert the official MATLAB file
to (``train.json`` / ``valid.json``): a list of one record per person,

    {"image": "015601864.jpg", "joints": [[x, y] * 16], "joints_vis": [0 or 1] * 16,
     "center": [x, y], "scale": s}

with MATLAB's 1-based pixel coordinates (shifted to 0-based here, as HRNet does) and the person's
height as ``scale`` x 200 px. The records become COCO keypoints (MPII's 12 limb joints at their COCO
places; COCO's five face joints, and MPII's pelvis, thorax, neck and head top, are left out) and
go through the COCO source, so both draw skeletons the same way: every person of an image on one
map, or one square crop per person (``per_person``, the box MPII's center and scale give).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from delvm.data.example import Skipped
from delvm.data.render import COCO_JOINTS
from delvm.data.sources.coco import coco_keypoints_source
from delvm.data.sources.common import Source
from delvm.errors import DelvmError
from delvm.fileio import read_json

# MPII joint index (0 r ankle, 1 r knee, 2 r hip, 3 l hip, 4 l knee, 5 l ankle, 10 r wrist,
# 11 r elbow, 12 r shoulder, 13 l shoulder, 14 l elbow, 15 l wrist) -> its COCO joint.
MPII_TO_COCO = {
    13: "left_shoulder", 12: "right_shoulder", 14: "left_elbow", 11: "right_elbow",
    15: "left_wrist", 10: "right_wrist", 3: "left_hip", 2: "right_hip",
    4: "left_knee", 1: "right_knee", 5: "left_ankle", 0: "right_ankle",
}  # fmt: skip
MPII_JOINTS = 16


def _keypoints(record: dict) -> np.ndarray:
    """COCO keypoints [17, 3] of one MPII record (ValueError if its fields are malformed)."""
    joints = np.asarray(record["joints"], dtype=np.float64).reshape(MPII_JOINTS, 2) - 1
    visible = np.asarray(record["joints_vis"], dtype=np.float64).reshape(MPII_JOINTS) > 0
    keypoints = np.zeros((len(COCO_JOINTS), 3))
    for mpii, name in MPII_TO_COCO.items():
        if visible[mpii]:
            keypoints[COCO_JOINTS.index(name)] = (*joints[mpii], 2)
    return keypoints


def mpii_as_coco(records: list, json_path: Path) -> tuple[dict, list[Skipped]]:
    """MPII's records as a COCO keypoints dict, and the records that could not be read."""
    images: dict[str, int] = {}
    annotations, skipped = [], []
    for index, record in enumerate(records):
        try:
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ValueError("no 'image' file name")
            keypoints = _keypoints(record)
            cx, cy = np.asarray(record["center"], dtype=np.float64).reshape(2) - 1
            side = 200 * float(record["scale"])  # the person's height
            if not side > 0:
                raise ValueError(f"scale {record['scale']}")
        except (KeyError, TypeError, ValueError) as err:
            skipped.append(Skipped(f"{json_path}#record={index}", f"not an MPII record ({err})"))
            continue
        image_id = images.setdefault(record["image"], len(images))
        annotations.append({
            "id": index, "image_id": image_id, "category_id": 1,
            "keypoints": keypoints.reshape(-1).tolist(),
            "bbox": [cx - side / 2, cy - side / 2, side, side],
        })  # fmt: skip
    coco = {
        "images": [{"id": i, "file_name": name} for name, i in images.items()],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO_JOINTS)}],
    }
    return coco, skipped


def iter_mpii(
    json_path: str | Path,
    image_dir: str | Path,
    task: str = "pose",
    per_person: bool = False,
    min_keypoints: int = 1,
    box_scale: float = 1.25,
) -> Source:
    """(photo, skeleton map) examples from MPII's annotations (HRNet / mmpose JSON) and images."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not image_dir.is_dir():
        raise DelvmError(f"{image_dir}: no such image folder (MPII source: check `image_dir`)")
    records = read_json(json_path)
    if not isinstance(records, list):
        raise DelvmError(
            f"{json_path}: not MPII annotations (expected a list of person records, as HRNet's "
            "and mmpose's train.json / valid.json)"
        )
    coco, skipped = mpii_as_coco(records, json_path)
    source = coco_keypoints_source(
        coco, json_path, image_dir, task, per_person, min_keypoints, box_scale
    )
    return Source(skipped + source.units, source.read)
