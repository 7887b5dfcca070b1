"""The unit every data source yields and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Example:
    """One example of a task: the images that sit side by side in a visual sentence.

    `images` are RGB uint8 arrays [H, W, 3] of one size, in sentence order: (input, output) for a
    pair, one image for unlabelled data, k frames for a clip. Targets are already rendered as images
    (masks, skeletons); `keypoints` keeps the pose annotation ([persons, 17, 3] as COCO x, y, v in
    pixels of `images`) so augmentation can move it with the pixels.

    `source` names the example uniquely (a file, plus "#..." where one file gives several).
    `meta["nearest"]`: one bool per image, True for colour-coded targets that must be resampled
    with nearest; `meta["skeleton"]`: index of the image that is `keypoints` drawn by
    `render_skeleton` (augmentation redraws it). See delvm.data.augment.
    """

    task: str
    images: list[np.ndarray]
    source: str
    keypoints: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Skipped:
    """A file or record a source could not use, with the reason shown in the build report."""

    source: str
    reason: str
