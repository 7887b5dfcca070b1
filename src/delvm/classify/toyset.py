"""The toy classification set: which kind of toy-world image is this?

Six classes, the two images of each of the toy world's three tasks (`delvm.data.toyworld`, the
data the toy LVMs are pretrained on): a segmentation scene or its instance map, a pose figure or
its skeleton map, a rainy photo or the clean one. Some pairs differ at a glance (a black-background
map against a scene), some only in detail (rain streaks over the same kinds of photo), so accuracy
climbs over a few hundred steps instead of saturating at once. A tiny trunk gets well above chance
in a couple of minutes on two CPU cores.

Image i of a split is image (i mod 2) of toy-world example i // 6 of task (i mod 6) // 2: classes
are balanced, and each image is a pure function of (seed, split, i). The validation split is drawn
from the world with seed + 1, so its scenes are not the training ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from delvm.data.toyworld import TASKS, ToyWorldConfig, toyworld_example
from delvm.errors import DelvmError

ROLES = ("input", "target")
KINDS = tuple((task, role) for task in TASKS for role in ROLES)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ToySection:
    """The toy set: `train` and `val` images (balanced over the classes), `resolution` px."""

    seed: int = 0
    resolution: int = 64
    train: int = 6000
    val: int = 600

    def __post_init__(self) -> None:
        if self.train < len(KINDS) or self.val < len(KINDS):
            raise DelvmError(
                f"data.toy.train / val ({self.train} / {self.val}): need at least one image per "
                f"class ({len(KINDS)})"
            )


class ToyWorldKinds:
    """One split of the toy set, generated on demand (the `LabelledImages` interface)."""

    def __init__(self, toy: ToySection, split: str):
        seed = toy.seed + SPLITS.index(split)
        self.world = ToyWorldConfig(seed=seed, resolution=toy.resolution)
        self.split = split
        self.count = toy.train if split == "train" else toy.val
        self.classes = [f"{task}-{role}" for task, role in KINDS]

    def __len__(self) -> int:
        return self.count

    def label(self, index: int) -> int:
        return index % len(KINDS)

    def name(self, index: int) -> str:
        return f"toyworld-kinds/{self.split}/{index:06d}"

    def load(self, index: int) -> np.ndarray:
        task, role = KINDS[self.label(index)]
        example = toyworld_example(self.world, task, index // len(KINDS))
        return example.images[ROLES.index(role)]


def write_toy_folders(toy: ToySection, out: str | Path) -> Path:
    """Write the set as image folders: OUT/train/<class>/NNNNNN.png and OUT/val/<class>/..."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DelvmError(f"{out}: not empty; choose a new folder or remove it")
    for split in SPLITS:
        images = ToyWorldKinds(toy, split)
        for name in images.classes:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for index in tqdm(range(len(images)), desc=split, unit="img"):
            path = out / split / images.classes[images.label(index)] / f"{index:06d}.png"
            Image.fromarray(images.load(index)).save(path)
    return out
