"""The toy world: a procedural, seeded generator of the paper's three tasks, the demo's default.

- segmentation: 1-3 large shapes (discs, ellipses, rectangles, triangles; flat colours or bold
  stripes/checks) over a low-contrast texture -> each visible instance in a random colour on black
  (SA-1B style), or every instance white on black (`segmentation_target="foreground"`, Pascal-5i
  style).
- pose: an articulated figure with COCO's 17 joints, drawn as thick limbs over a texture or a
  dimmed sample photo -> its skeleton map (render.py's colour code).
- derain: a packaged sample photo (assets/, see LICENSES.md) or a procedural texture with bold
  synthetic rain streaks -> the clean image.

Built for a small model on a 64 px f8 tokenizer to learn: few, large, high-contrast shapes, thick
limbs, bold streaks, and the three tasks look nothing alike. `textures=False` goes further for
the 2-core demo: flat fills and gentle gradients only (derain scenes are shapes on a gradient),
which a tokenizer trained for minutes reconstructs; `rain` scales the streaks; foreground targets
give segmentation one answer per scene (random instance colours cannot be predicted, so a small
model's most likely code there is black). Every example is a pure function of (seed, task, index),
so any subset can be regenerated. Counts are long-tailed by default (segmentation 20x each of the
others), so balancing matters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from delvm.data.augment import CropParams, crop_resize
from delvm.data.example import Example
from delvm.data.images import load_image
from delvm.data.render import (
    COCO_JOINTS,
    paint_capsule,
    render_foreground,
    render_instances,
    render_skeleton,
)
from delvm.errors import DelvmError
from delvm.fileio import write_json

TASKS = ("segmentation", "pose", "derain")
# Whether a task's target is a colour code (resampled with nearest) rather than a photo.
NEAREST_TARGET = {"segmentation": True, "pose": True, "derain": False}
SEGMENTATION_TARGETS = ("instances", "foreground")


@dataclass(frozen=True)
class ToyWorldConfig:
    """seed: the world's seed; resolution: image side in pixels; segmentation, pose, derain:
    examples per task; mixed: the share of each task's examples drawn as a mixed scene (shapes, a
    figure and rain in one input; see `mixed_scene`); textures: patterned fills and sample photos
    (False: flat colours and gentle gradients only, a world a CPU-sized tokenizer reconstructs);
    rain: how many streaks fall, relative to the default 15-30 per image; segmentation_target:
    "instances" (each instance in a random colour) or "foreground" (every instance white)."""

    seed: int = 0
    resolution: int = 64
    segmentation: int = 2000
    pose: int = 100
    derain: int = 100
    mixed: float = 0.0
    textures: bool = True
    rain: float = 1.0
    segmentation_target: str = "instances"

    def __post_init__(self) -> None:
        if not 32 <= self.resolution <= 1024:
            raise DelvmError(f"toyworld resolution {self.resolution}: use 32..1024 (default 64)")
        for task in TASKS:
            if getattr(self, task) < 0:
                raise DelvmError(f"toyworld {task} count {getattr(self, task)}: must be >= 0")
        if not 0 <= self.mixed <= 1:
            raise DelvmError(f"toyworld mixed = {self.mixed}: use a share between 0 and 1")
        if not 0 < self.rain <= 10:
            raise DelvmError(f"toyworld rain = {self.rain}: use a density in (0, 10] (default 1)")
        if self.segmentation_target not in SEGMENTATION_TARGETS:
            raise DelvmError(
                f"toyworld segmentation_target = {self.segmentation_target!r}: use one of "
                f"{SEGMENTATION_TARGETS}"
            )

    def counts(self) -> dict[str, int]:
        return {task: getattr(self, task) for task in TASKS}


# --- pixels -------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) in [0, 1], so scenes do not depend on the resolution."""
    centres = (np.arange(size) + 0.5) / size
    return centres[None, :], centres[:, None]


def _colour(rng: np.random.Generator, away_from=None, distance: float = 120.0) -> np.ndarray:
    """A random RGB colour (float), at least `distance` away from `away_from` if given."""
    while True:
        colour = rng.uniform(0, 255, 3)
        if away_from is None or np.linalg.norm(colour - away_from) >= distance:
            return colour


def _pattern(rng: np.random.Generator, size: int, textured: bool) -> np.ndarray:
    """A [size, size] pattern in [0, 1]: stripes, checks, smooth noise or a gradient (only a
    gradient when not `textured`)."""
    x, y = _grid(size)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    period = rng.uniform(0.12, 0.3)
    kind = rng.integers(4) if textured else 3
    if kind == 0:
        return (np.floor(u / period) % 2) * np.ones_like(v)
    if kind == 1:
        return (np.floor(u / period) + np.floor(v / period)) % 2
    if kind == 2:
        cells = int(rng.integers(3, 7))
        small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC)) / 255.0
    return np.clip(u, 0, 1) * np.ones_like(v)


def _texture(
    rng: np.random.Generator, size: int, a: np.ndarray, b: np.ndarray, textured: bool
) -> np.ndarray:
    """A pattern coloured from `a` to `b`, float [size, size, 3]."""
    t = _pattern(rng, size, textured)[..., None]
    return a * (1 - t) + b * t


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    folder = resources.files("delvm.data") / "assets"
    paths = sorted(p for p in folder.iterdir() if p.name.endswith(".jpg"))
    with resources.as_file(folder) as local:
        return tuple(load_image(Path(local) / p.name) for p in paths)


def _photo_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop (40-100 % of the shorter side, maybe mirrored) of a sample photo."""
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    height, width = photo.shape[:2]
    side = int(min(height, width) * rng.uniform(0.4, 1.0))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    params = CropParams(top, left, side, side, flip=bool(rng.random() < 0.5))
    return crop_resize(photo, params, size, nearest=False).astype(np.float64)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# --- segmentation -------------------------------------------------------------------------------


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One random large shape as a bool mask: disc, ellipse, rectangle or triangle."""
    x, y = _grid(size)
    cx, cy = rng.uniform(0.22, 0.78, 2)
    radius = rng.uniform(0.16, 0.3)
    angle = rng.uniform(0, 2 * math.pi)
    u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
    v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
    aspect = rng.uniform(0.5, 0.9)
    kind = rng.integers(4)
    if kind == 0:
        return u**2 + v**2 <= radius**2
    if kind == 1:
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1
    if kind == 2:
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
    # Equilateral triangle: inside all three edges' half-planes.
    inside = np.ones((size, size), dtype=bool)
    for k in range(3):
        normal = angle + math.pi / 3 + 2 * math.pi * k / 3
        inside &= (x - cx) * math.cos(normal) + (y - cy) * math.sin(normal) <= 0.6 * radius
    return inside


def _paint_shapes(
    rng: np.random.Generator,
    image: np.ndarray,
    wanted: int,
    textured: bool,
    keep: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Paint up to `wanted` shapes onto `image` (float, in place); return their visible masks.

    Every instance keeps >= 3 % of the image after occlusion. Any single shape does (centres
    and radii keep it mostly inside), so the first always fits and no scene is empty. Pixels in
    `keep` (a figure to be painted later) do not count as visible.
    """
    size = image.shape[0]
    mean = image.reshape(-1, 3).mean(axis=0)
    min_area = 0.03 * size * size
    hidden = np.zeros((size, size), dtype=bool) if keep is None else keep
    masks: list[np.ndarray] = []
    fills: list[np.ndarray] = []
    for _attempt in range(5 * wanted):
        if len(masks) == wanted:
            break
        shape = _shape_mask(rng, size)
        # Later shapes lie on top: earlier instances lose what the new one covers.
        visible = [m & ~shape for m in masks] + [shape & ~hidden]
        if all(np.count_nonzero(m) >= min_area for m in visible):
            masks = visible
            colour = _colour(rng, mean)
            if textured and rng.random() < 0.35:
                fills.append(_texture(rng, size, colour, _colour(rng, colour), textured))
            else:
                fills.append(np.broadcast_to(colour, (size, size, 3)))
    for mask, fill in zip(masks, fills, strict=True):
        image[mask] = fill[mask]
    return masks


def _shape_scene(
    rng: np.random.Generator, size: int, textured: bool
) -> tuple[np.ndarray, list[np.ndarray]]:
    """1-3 shapes over a low-contrast background: the image (float) and the shapes' masks."""
    base = rng.uniform(30, 200, 3)
    image = _texture(rng, size, base, np.clip(base + rng.uniform(-35, 35, 3), 0, 255), textured)
    return image, _paint_shapes(rng, image, wanted=int(rng.integers(1, 4)), textured=textured)


def _segmentation_target(
    rng: np.random.Generator, masks: list[np.ndarray], config: ToyWorldConfig
) -> np.ndarray:
    seed = int(rng.integers(2**32))  # drawn for both kinds, so the rest of the scene is the same
    if config.segmentation_target == "foreground":
        return render_foreground(np.logical_or.reduce(masks))
    return render_instances(masks, seed=seed)


def _segmentation(rng: np.random.Generator, config: ToyWorldConfig) -> Example:
    image, masks = _shape_scene(rng, config.resolution, config.textures)
    target = _segmentation_target(rng, masks, config)
    return Example("segmentation", [_to_uint8(image), target], "", meta={"nearest": [False, True]})


# --- pose ---------------------------------------------------------------------------------------


def _limb(start: np.ndarray, angle: float, length: float, side: int) -> np.ndarray:
    """The end of a limb leaving `start` at `angle` from straight down, outward on `side`."""
    return start + length * np.array([side * math.sin(angle), math.cos(angle)])


# Face joints (nose, eyes, ears) relative to the head centre, in body units.
FACE = np.array([(0.0, 0.0), (0.25, -0.2), (-0.25, -0.2), (0.5, -0.05), (-0.5, -0.05)])


def _figure(rng: np.random.Generator) -> np.ndarray:
    """A frontal figure's 17 joints (x, y) in body units (head ~ 1), y down, unplaced.

    The person's left (side +1) is the image's right, as for a person facing the camera.
    """
    joints = np.zeros((len(COCO_JOINTS), 2))
    lean = rng.uniform(-0.2, 0.2)  # upper body tilt around the hips
    tilt = np.array([[math.cos(lean), -math.sin(lean)], [math.sin(lean), math.cos(lean)]])
    neck = tilt @ [0.0, -2.5]
    head = tilt @ [0.0, -3.4]
    joints[:5] = head + (FACE + [rng.uniform(-0.15, 0.15), 0.0]) @ tilt.T
    for side, (shoulder, elbow, wrist, hip, knee, ankle) in (
        (1, (5, 7, 9, 11, 13, 15)),
        (-1, (6, 8, 10, 12, 14, 16)),
    ):
        joints[shoulder] = neck + tilt @ [side * 0.9, 0.1]
        arm = rng.uniform(-0.2, 2.6)  # 0 hangs down, pi/2 points sideways, more is raised
        joints[elbow] = _limb(joints[shoulder], arm, 1.3, side)
        joints[wrist] = _limb(joints[elbow], arm + rng.uniform(-1.2, 1.2), 1.2, side)
        joints[hip] = [side * 0.8, 0.0]  # wide enough that the hip joints' discs do not touch
        leg = rng.uniform(-0.1, 0.55)
        joints[knee] = _limb(joints[hip], leg, 1.8, side)
        joints[ankle] = _limb(joints[knee], leg + rng.uniform(-0.5, 0.5), 1.8, side)
    return joints


def _place(rng: np.random.Generator, joints: np.ndarray, size: int, margin: float):
    """Scale and move body-unit joints into the image, `margin` pixels from every edge."""
    low, high = joints.min(axis=0), joints.max(axis=0)
    extent = high - low
    room = size - 2 * margin
    scale = min(room * rng.uniform(0.7, 1.0) / extent[1], room / extent[0])
    placed = (joints - low) * scale
    span = extent * scale
    offset = margin + rng.uniform(0, 1, 2) * (room - span)
    return placed + offset, scale


# Arms, legs, shoulder and hip lines: the figure's limbs (the face is drawn as one head disc).
BODY_PARTS = (
    (5, 7),
    (7, 9),
    (6, 8),
    (8, 10),
    (11, 13),
    (13, 15),
    (12, 14),
    (14, 16),
    (5, 6),
    (11, 12),
)


def _pose_background(rng: np.random.Generator, size: int, textured: bool) -> np.ndarray:
    if not textured or rng.random() < 0.5:
        background = _texture(rng, size, _colour(rng), _colour(rng), textured)
    else:
        photo = _photo_crop(rng, size)
        background = 0.5 * photo + 0.5 * photo.mean(axis=(0, 1))  # dimmed so the figure stands out
    return 0.6 * background + 0.4 * background.mean()  # low contrast either way


def _figure_masks(joints: np.ndarray, unit: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The figure's body (torso and limbs) and skin (neck and head) masks."""
    body, skin = np.zeros((size, size)), np.zeros((size, size))
    hips = (joints[11] + joints[12]) / 2
    shoulders = (joints[5] + joints[6]) / 2
    paint_capsule(body, shoulders, hips, 0.75 * unit, 1.0)
    for a, b in BODY_PARTS:
        paint_capsule(body, joints[a], joints[b], 0.3 * unit, 1.0)
    head = joints[[1, 2, 3, 4]].mean(axis=0)
    paint_capsule(skin, shoulders, head, 0.25 * unit, 1.0)
    paint_capsule(skin, head, head, 0.6 * unit, 1.0)
    skin = skin > 0
    return (body > 0) & ~skin, skin


def _place_figure(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """A figure's joints in pixels and its body unit."""
    return _place(rng, _figure(rng), size, margin=size / 12)


def _paint_figure(
    rng: np.random.Generator, image: np.ndarray, joints: np.ndarray, unit: float
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the figure onto `image` (float, in place); return its keypoints [1, 17, 3] and mask."""
    mean = image.reshape(-1, 3).mean(axis=0)
    body, skin = _figure_masks(joints, unit, image.shape[0])
    image[body] = _colour(rng, mean, 150)
    image[skin] = _colour(rng, mean, 150)
    keypoints = np.concatenate([joints, np.full((len(joints), 1), 2.0)], axis=1)[None]
    return keypoints, body | skin


def _pose(rng: np.random.Generator, config: ToyWorldConfig) -> Example:
    size = config.resolution
    image = _pose_background(rng, size, config.textures)
    keypoints, _ = _paint_figure(rng, image, *_place_figure(rng, size))
    target = render_skeleton(keypoints, size, size)
    return Example(
        "pose",
        [_to_uint8(image), target],
        "",
        keypoints=keypoints,
        meta={"nearest": [False, True], "skeleton": 1},
    )


# --- deraining ----------------------------------------------------------------------------------


def _rain(rng: np.random.Generator, size: int, density: float) -> np.ndarray:
    """A rain layer [size, size] in [0, 1]: bold parallel streaks with jittered length."""
    layer = np.zeros((size, size))
    angle = rng.uniform(-0.5, 0.5)  # from vertical, shared by every streak
    direction = np.array([math.sin(angle), math.cos(angle)])
    # Length and width scale with the image, so a fixed count covers the same fraction of it.
    count = round(int(rng.integers(15, 31)) * density)
    width = size / 32
    for _ in range(count):
        start = rng.uniform(-0.1, 1.1, 2) * size
        length = rng.uniform(0.1, 0.25) * size
        paint_capsule(layer, start, start + length * direction, width / 2, rng.uniform(0.6, 1.0))
    return layer


def _add_rain(rng: np.random.Generator, clean: np.ndarray, density: float) -> np.ndarray:
    alpha = _rain(rng, clean.shape[0], density)[..., None] * rng.uniform(0.7, 0.95)
    return clean * (1 - alpha) + rng.uniform(215, 255) * alpha


def _derain(rng: np.random.Generator, config: ToyWorldConfig) -> Example:
    """A photo (70 %) or a texture under rain; untextured: a gradient with flat shapes."""
    size, textured = config.resolution, config.textures
    if not textured:
        clean, _ = _shape_scene(rng, size, textured)
    elif rng.random() < 0.7:
        clean = _photo_crop(rng, size)
    else:
        clean = _texture(rng, size, _colour(rng), _colour(rng), textured)
    return Example(
        "derain",
        [_to_uint8(_add_rain(rng, clean, config.rain)), _to_uint8(clean)],
        "",
        meta={"nearest": [False, False]},
    )


# --- mixed scenes -------------------------------------------------------------------------------


def mixed_scene(rng: np.random.Generator, config: ToyWorldConfig) -> dict[str, Example]:
    """One rainy scene holding shapes and a figure, with a ground truth for every task.

    Its input fits every task, so only a prompt's examples can say which answer is wanted: these
    scenes teach a model to read the task from the prompt, and they are the task-recognition
    set's queries. Segmentation's instances are the shapes and the figure.
    """
    size, textured = config.resolution, config.textures
    image = _pose_background(rng, size, textured)
    joints, unit = _place_figure(rng, size)
    body, skin = _figure_masks(joints, unit, size)
    # The figure stands in front: shapes count only what it leaves visible.
    shapes = _paint_shapes(
        rng, image, wanted=int(rng.integers(1, 3)), textured=textured, keep=body | skin
    )
    keypoints, figure = _paint_figure(rng, image, joints, unit)
    rainy = _to_uint8(_add_rain(rng, image, config.rain))
    segmentation = _segmentation_target(rng, [*shapes, figure], config)
    targets = {
        "segmentation": segmentation,
        "pose": render_skeleton(keypoints, size, size),
        "derain": _to_uint8(image),
    }
    return {
        task: Example(
            task,
            [rainy, target],
            "",
            keypoints=keypoints if task == "pose" else None,
            meta={
                "nearest": [False, NEAREST_TARGET[task]],
                **({"skeleton": 1} if task == "pose" else {}),
            },
        )
        for task, target in targets.items()
    }


GENERATORS = {"segmentation": _segmentation, "pose": _pose, "derain": _derain}
MIXED_STREAM, RECOGNITION_STREAM = 101, 102


def recognition_set(config: ToyWorldConfig, count: int) -> dict[str, list[Example]]:
    """`count` mixed scenes, each with one example per task sharing its input: the queries (and
    supports) of task recognition. Scene i depends on (seed, i) only."""
    scenes = [
        mixed_scene(np.random.default_rng([config.seed, RECOGNITION_STREAM, i]), config)
        for i in range(count)
    ]
    for i, scene in enumerate(scenes):
        for example in scene.values():
            example.source = f"toyworld/recognition/{i:06d}"
    return {task: [scene[task] for scene in scenes] for task in TASKS}


def toyworld_example(config: ToyWorldConfig, task: str, index: int) -> Example:
    """Example `index` of `task`: depends on (seed, task, index) only."""
    rng = np.random.default_rng([config.seed, TASKS.index(task), index])
    # A stream of its own decides "mixed", so mixed = 0 leaves every other example as it was.
    if np.random.default_rng([config.seed, MIXED_STREAM, TASKS.index(task), index]).random() < (
        config.mixed
    ):
        example = mixed_scene(rng, config)[task]
    else:
        example = GENERATORS[task](rng, config)
    example.source = f"toyworld/{task}/{index:06d}"
    return example


def iter_toyworld(config: ToyWorldConfig) -> Iterator[Example]:
    """Every example of the world, task by task (segmentation, pose, derain), in index order."""
    for task, count in config.counts().items():
        for index in range(count):
            yield toyworld_example(config, task, index)


def write_toyworld(config: ToyWorldConfig, out: str | Path, progress: bool = True) -> dict:
    """Write the world in the paired-folder layout; return the summary also saved as JSON.

    OUT/<task>/input/<task>_NNNNNN.png and OUT/<task>/target/<task>_NNNNNN.png (lossless, so
    colour codes survive), OUT/pose/keypoints.json, and OUT/toyworld.json with the config and,
    per task, the `paired` source arguments that read it back.
    """
    from delvm.data.sources.paired import write_keypoints_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DelvmError(f"{out}: not empty; choose a new folder or remove it")
    summary = {"format": "delvm-toyworld", "config": asdict(config), "tasks": {}}
    total = sum(config.counts().values())
    bar = tqdm(total=total, desc="toyworld", unit="ex", disable=not progress)
    for task, count in config.counts().items():
        folders = {name: out / task / name for name in ("input", "target")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        keypoints = {}
        for index in range(count):
            example = toyworld_example(config, task, index)
            name = f"{task}_{index:06d}"
            for folder, image in zip(folders.values(), example.images, strict=True):
                Image.fromarray(image).save(folder / f"{name}.png")
            if example.keypoints is not None:
                keypoints[name] = example.keypoints
            bar.update()
        source = {
            "format": "paired",
            "root": str(out / task),
            "task": task,
            "target_nearest": NEAREST_TARGET[task],
        }
        if keypoints:
            write_keypoints_file(out / task / "keypoints.json", keypoints)
            source["keypoints_file"] = str(out / task / "keypoints.json")
        summary["tasks"][task] = {"count": count, "source": source}
    bar.close()
    write_json(out / "toyworld.json", summary)
    return summary
