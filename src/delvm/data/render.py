"""Annotations drawn as target images, and the colour codes that let evaluation read them back.

Three renderings, all on black:

- instance masks: one random colour per instance (seeded). Larger instances are painted first so
  a smaller one lying on top stays visible; colours are assigned, never summed, so overlaps cannot
  wrap around uint8.
- foreground masks: white.
- keypoints: COCO's 17 joints and 19 limbs. Every joint has its own fixed *bright* colour (each
  channel 0, 128 or 255, at least one 255) and every limb its own fixed *dim* colour (each channel
  0, 64 or 128, at least one 128). The tables below are the task's contract: `decode_skeleton`
  finds a joint as the blob of its colour, and joints are told from limbs by brightness alone.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np

# COCO keypoint order ("left" is the person's left).
COCO_JOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip

# Joint each joint becomes under a horizontal flip (left <-> right), as COCO evaluation does.
COCO_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)

# COCO's 19 limbs (the `skeleton` of person_keypoints_*.json), as 0-based joint pairs.
COCO_LIMBS = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip

# One bright colour per joint, in COCO_JOINTS order. Any two differ by >= 127 in some channel;
# neighbouring joints (eyes, ears, nose) get the most distant ones.
JOINT_COLOURS = np.array(
    [
        (255, 0, 0),      # nose: red
        (0, 0, 255),      # left_eye: blue
        (0, 255, 0),      # right_eye: green
        (255, 0, 255),    # left_ear: magenta
        (0, 255, 255),    # right_ear: cyan
        (255, 255, 0),    # left_shoulder: yellow
        (128, 0, 255),    # right_shoulder: violet
        (255, 128, 0),    # left_elbow: orange
        (0, 128, 255),    # right_elbow: azure
        (255, 0, 128),    # left_wrist: rose
        (0, 255, 128),    # right_wrist: spring green
        (128, 255, 0),    # left_hip: chartreuse
        (255, 128, 255),  # right_hip: pink
        (255, 128, 128),  # left_knee: salmon
        (128, 128, 255),  # right_knee: periwinkle
        (128, 255, 128),  # left_ankle: light green
        (128, 255, 255),  # right_ankle: light cyan
    ],
    dtype=np.uint8,
)  # fmt: skip

# One dim colour per limb, in COCO_LIMBS order: all 19 colours with channels in {0, 64, 128}
# and at least one 128, so no limb pixel is ever as bright as a joint.
LIMB_COLOURS = np.array(
    [
        (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0), (0, 128, 128), (128, 0, 128),
        (128, 64, 0), (0, 64, 128), (128, 0, 64), (0, 128, 64), (64, 128, 0), (64, 0, 128),
        (128, 128, 128), (128, 64, 64), (64, 128, 64), (64, 64, 128), (128, 128, 64),
        (64, 128, 128), (128, 64, 128),
    ],
    dtype=np.uint8,
)  # fmt: skip

# A pixel whose brightest channel reaches this is a joint pixel; limbs peak at 128.
JOINT_MIN_BRIGHTNESS = 192


def instance_colours(count: int, seed: int) -> np.ndarray:
    """`count` random bright colours [count, 3] uint8; colour i depends only on (seed, i)."""
    rng = np.random.default_rng(seed)
    hsv = rng.random((count, 3))
    # Full hue range; saturation and value kept high so no instance looks like the background.
    rgb = [colorsys.hsv_to_rgb(h, 0.5 + 0.5 * s, 0.7 + 0.3 * v) for h, s, v in hsv]
    return np.round(np.array(rgb, dtype=np.float64).reshape(count, 3) * 255).astype(np.uint8)


def render_instances(
    masks: Sequence[np.ndarray],
    seed: int,
    areas: Sequence[float] | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Instance masks (each [H, W] bool) -> RGB uint8 [H, W, 3], instance i in its seeded colour.

    Painted largest first (stable for ties) so small instances on top of large ones stay visible.
    `masks` may be any sequence that decodes lazily on indexing; pass `areas` to avoid decoding
    twice, and `boxes` (COCO x, y, w, h, each holding its whole mask) to paint within each box
    only: an SA-1B photo has ~100 masks of ~3 MP, most of them small.
    """
    if len(masks) == 0:
        raise ValueError("render_instances needs at least one mask (the image size comes from it)")
    colours = instance_colours(len(masks), seed)
    if areas is None:
        areas = [int(np.count_nonzero(m)) for m in masks]
    order = np.argsort(-np.asarray(areas, dtype=np.float64), kind="stable")
    canvas = None
    for i in order:
        mask = np.asarray(masks[i], dtype=bool)
        if canvas is None:
            canvas = np.zeros((*mask.shape, 3), dtype=np.uint8)
        if boxes is None:
            canvas[mask] = colours[i]
            continue
        x, y, w, h = boxes[i]
        rows = slice(int(np.floor(y)), int(np.ceil(y + h)))
        columns = slice(int(np.floor(x)), int(np.ceil(x + w)))
        canvas[rows, columns][mask[rows, columns]] = colours[i]
    return canvas


def render_foreground(mask: np.ndarray) -> np.ndarray:
    """A foreground mask [H, W] (bool or 0/1) -> white on black RGB uint8 [H, W, 3]."""
    mask = np.asarray(mask, dtype=bool)
    return np.repeat(mask[..., None], 3, axis=2).astype(np.uint8) * 255


def skeleton_widths(height: int, width: int) -> tuple[float, float]:
    """Default (joint radius, limb width) in pixels: 1/16 and 1/20 of the shorter side.

    At 64 px that is a 9-pixel joint disc and a 3-pixel limb, so each joint covers most of an
    8x8 tokenizer patch.
    """
    side = min(height, width)
    return max(1.5, side / 16), max(1.0, side / 20)


def paint_capsule(
    canvas: np.ndarray, a: Sequence[float], b: Sequence[float], radius: float, colour
) -> None:
    """Set every pixel of `canvas` whose centre lies within `radius` of segment a-b (x, y).

    A capsule with a == b is a disc. Only the segment's bounding box is computed.
    """
    height, width = canvas.shape[:2]
    top = max(0, int(np.floor(min(a[1], b[1]) - radius)))
    bottom = min(height, int(np.ceil(max(a[1], b[1]) + radius)) + 1)
    left = max(0, int(np.floor(min(a[0], b[0]) - radius)))
    right = min(width, int(np.ceil(max(a[0], b[0]) + radius)) + 1)
    if top >= bottom or left >= right:
        return
    ys, xs = np.arange(top, bottom)[:, None] + 0.5, np.arange(left, right)[None, :] + 0.5
    direction = np.subtract(b, a, dtype=np.float64)
    length2 = float(direction @ direction)
    t = 0.0 if length2 == 0 else ((xs - a[0]) * direction[0] + (ys - a[1]) * direction[1]) / length2
    t = np.clip(t, 0.0, 1.0)
    dist2 = (xs - a[0] - t * direction[0]) ** 2 + (ys - a[1] - t * direction[1]) ** 2
    canvas[top:bottom, left:right][dist2 <= radius**2] = colour


def render_skeleton(
    keypoints: np.ndarray,
    height: int,
    width: int,
    joint_radius: float | None = None,
    limb_width: float | None = None,
) -> np.ndarray:
    """COCO keypoints [persons, 17, 3] (x, y, v in pixels) -> skeleton map RGB uint8 [H, W, 3].

    Joints with v > 0 are drawn as discs in JOINT_COLOURS over limbs in LIMB_COLOURS (a limb only
    when both its joints have v > 0), joint 16 first and the nose last. Pixel (row i, column j)
    covers [j, j+1) x [i, i+1).
    """
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, len(COCO_JOINTS), 3)
    default_radius, default_width = skeleton_widths(height, width)
    radius = default_radius if joint_radius is None else joint_radius
    half_width = (default_width if limb_width is None else limb_width) / 2
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for person in keypoints:
        for (i, j), colour in zip(COCO_LIMBS, LIMB_COLOURS, strict=True):
            if person[i, 2] > 0 and person[j, 2] > 0:
                paint_capsule(canvas, person[i, :2], person[j, :2], half_width, colour)
    for person in keypoints:
        # Last joint first, so the crowded face joints (nose, eyes) end up on top.
        for joint, colour in zip(person[::-1], JOINT_COLOURS[::-1], strict=True):
            if joint[2] > 0:
                paint_capsule(canvas, joint[:2], joint[:2], radius, colour)
    return canvas


def decode_skeleton(image: np.ndarray, min_pixels: int = 2, tolerance: float = 80.0) -> np.ndarray:
    """Read a single-person skeleton map back into COCO keypoints [17, 3] (x, y, v).

    Each pixel at least JOINT_MIN_BRIGHTNESS bright is given the nearest joint colour (if within
    `tolerance`); a joint is the centroid of its pixels' centres, v = 2, when it has at least
    `min_pixels` of them, else (0, 0, 0). Works on generated (blurred, noisy) maps as well as on
    exact renderings.
    """
    image = np.asarray(image)
    pixels = image.reshape(-1, 3).astype(np.float32)
    bright = pixels.max(axis=1) >= JOINT_MIN_BRIGHTNESS
    distances = np.linalg.norm(
        pixels[bright, None, :] - JOINT_COLOURS[None].astype(np.float32), axis=2
    )
    labels = np.full(len(pixels), -1)
    nearest = distances.argmin(axis=1)
    labels[bright] = np.where(distances.min(axis=1) <= tolerance, nearest, -1)
    ys, xs = np.indices(image.shape[:2]).reshape(2, -1) + 0.5
    keypoints = np.zeros((len(COCO_JOINTS), 3))
    for joint in range(len(COCO_JOINTS)):
        hit = labels == joint
        if np.count_nonzero(hit) >= min_pixels:
            keypoints[joint] = xs[hit].mean(), ys[hit].mean(), 2
    return keypoints
