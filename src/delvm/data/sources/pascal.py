"""Pascal-5i few-shot segmentation on a VOC folder -> (photo, one class as white on black).

Layout: VOC_ROOT/JPEGImages/NAME.jpg, VOC_ROOT/SegmentationClassAug/NAME.png (SBD-augmented,
grayscale class indices) or VOC_ROOT/SegmentationClass/NAME.png (palette), and an image list,
by default VOC_ROOT/ImageSets/Segmentation/{train,val}.txt. Fold i holds classes 5i+1..5i+5
(OSLSM's split): "val" gives those classes on the val list, "train" the other 15 classes on the
train list, where fold-i pixels simply stay background. One example per (image, class present);
255 (object boundaries, "void") is background. The list may instead be one of the fold lists of
HSNet and Bar et al. (``fold0.txt``: one "NAME__CLASS" line per image and class).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from delvm.data.example import Example, Skipped
from delvm.data.images import open_image
from delvm.data.render import render_foreground
from delvm.data.sources.common import Source, load_or_skip
from delvm.errors import DelvmError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def fold_classes(fold: int, split: str) -> list[int]:
    """Class ids (1..20) of a Pascal-5i fold: its 5 for "val", the other 15 for "train"."""
    if fold not in (0, 1, 2, 3):
        raise DelvmError(f"pascal5i fold {fold}: must be 0, 1, 2 or 3")
    held = list(range(5 * fold + 1, 5 * fold + 6))
    if split == "val":
        return held
    if split == "train":
        return [c for c in range(1, 21) if c not in held]
    raise DelvmError(f"pascal5i split {split!r}: must be 'train' or 'val'")


def _label_map(path: Path) -> np.ndarray | Skipped:
    """A class-index PNG (palette or grayscale) as uint8 [H, W], or why it cannot be read."""
    if not path.is_file():
        return Skipped(str(path), "no such mask file")
    try:
        with open_image(path) as image:
            if image.mode not in ("P", "L"):
                return Skipped(str(path), f"mode {image.mode}: expected class indices (P or L)")
            return np.asarray(image, dtype=np.uint8).copy()
    except DelvmError as err:
        return Skipped(str(path), f"unreadable mask ({str(err).removeprefix(f'{path}: ')})")
    except (OSError, SyntaxError, ValueError) as err:
        return Skipped(str(path), f"unreadable mask ({err})")


def _list_entries(list_path: Path) -> list[tuple[str, int | None]]:
    """(image name, the one class it stands for or None: every fold class) per list line.

    Lines are "NAME" (VOC), "/JPEGImages/NAME.jpg /SegmentationClassAug/NAME.png" (SBD) or
    "NAME__CLASS" (HSNet's fold lists, which Bar et al. use: CLASS 1..20).
    """
    entries = []
    for number, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, fold_list, named = Path(line.split()[0]).stem.partition("__")
        if fold_list and not (named.isdigit() and 1 <= int(named) <= 20):
            raise DelvmError(
                f"{list_path}:{number}: {line.strip()!r}: expected NAME__CLASS, CLASS in 1..20"
            )
        entries.append((name, int(named) if fold_list else None))
    return entries


def iter_pascal5i(
    voc_root: str | Path,
    fold: int,
    split: str = "train",
    task: str = "foreground",
    mask_dir: str | None = None,
    list_file: str | Path | None = None,
    min_pixels: int = 1,
) -> Source:
    """(photo, class mask) examples of Pascal-5i fold `fold`, split "train" or "val"."""
    root = Path(voc_root)
    classes = fold_classes(fold, split)
    if mask_dir is None:
        augmented = (root / "SegmentationClassAug").is_dir()
        mask_dir = "SegmentationClassAug" if augmented else "SegmentationClass"
    default_list = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    list_path = Path(list_file) if list_file else default_list
    for needed in (root / "JPEGImages", root / mask_dir):
        if not needed.is_dir():
            raise DelvmError(f"{needed}: missing (Pascal-5i source needs a VOC folder layout)")
    if not list_path.is_file():
        raise DelvmError(f"{list_path}: missing image list (give `list_file`)")
    units = []
    for name, named in _list_entries(list_path):
        if named is not None and named not in classes:
            units.append(
                Skipped(f"{list_path}: {name}__{named}", f"not a fold-{fold} {split} class")
            )
        else:
            image = root / "JPEGImages" / f"{name}.jpg"
            units.append(
                (image, root / mask_dir / f"{name}.png", classes if named is None else [named])
            )
    read = partial(_read_entry, task=task, min_pixels=min_pixels, fold=fold)
    return Source(units, read)


def _read_entry(
    unit: tuple[Path, Path, list[int]], task: str, min_pixels: int, fold: int
) -> Iterator[Example | Skipped]:
    """An image's example for each of `classes` it shows (at least `min_pixels` pixels)."""
    image_path, mask_path, classes = unit
    labels = _label_map(mask_path)
    if isinstance(labels, Skipped):
        yield labels
        return
    image = load_or_skip(image_path)
    if isinstance(image, Skipped):
        yield image
        return
    if image.shape[:2] != labels.shape:
        yield Skipped(str(image_path), "image and mask sizes differ")
        return
    for c in classes:
        mask = labels == c
        if np.count_nonzero(mask) >= min_pixels:
            yield Example(
                task,
                [image, render_foreground(mask)],
                source=f"{image_path}#class={c}",
                meta={"nearest": [False, True], "class": VOC_CLASSES[c - 1], "fold": fold},
            )
