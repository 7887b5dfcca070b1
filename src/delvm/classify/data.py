"""Labelled images for classification: image folders or the toy set, augmented, in batches.

An image folder holds one sub-folder per class (``ROOT/CLASS/*.jpg``, ImageNet's layout); class
indices follow the sorted sub-folder names. Images are read when a batch needs them, so a folder
of any size opens in seconds.

Training sample k of a run (k = step x batch + row) is a pure function of (seed, k): the epoch's
shuffled order picks the image, and RandomResizedCrop + flip, then RandAugment and random erasing
(`PixelAugment`, kornia's), draw from generators seeded by k. So a resumed run sees exactly what
an uninterrupted one would, whatever the number of loader workers.
An unreadable file is skipped with a warning naming it and the reason; in training its slot takes
the next image of the epoch's order, in evaluation it is left out of the metrics and counted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from delvm.data.augment import AugmentConfig, CropParams, crop_resize, sample_crop
from delvm.data.images import IMAGE_SUFFIXES, list_images, load_image
from delvm.errors import DelvmError


class LabelledImages(Protocol):
    """What classification needs from a data set: class names, and images by index."""

    classes: list[str]

    def __len__(self) -> int: ...

    def label(self, index: int) -> int: ...

    def name(self, index: int) -> str: ...

    def load(self, index: int) -> np.ndarray:
        """RGB uint8 [H, W, 3]; DelvmError (naming the file) if it cannot be read."""
        ...


class ImageFolder:
    """ROOT/CLASS/**/IMAGE files; classes are the sorted sub-folder names."""

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise DelvmError(
                f"{root}: no such image folder; point data.train / data.val (or --data) at a "
                "folder with one sub-folder of images per class"
            )
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(folders) < 2:
            raise DelvmError(
                f"{root}: {len(folders)} class sub-folder(s); a classification set needs one "
                "sub-folder per class (ROOT/CLASS/*.jpg), at least two"
            )
        self.root = root
        self.classes = [folder.name for folder in folders]
        self.paths: list[str] = []
        labels = []
        for label, folder in enumerate(folders):
            found = list_images(folder)
            if not found:
                raise DelvmError(
                    f"{folder}: class folder holds no images ({' '.join(IMAGE_SUFFIXES)}); add "
                    "images or remove the folder"
                )
            self.paths += [str(p) for p in found]
            labels += [label] * len(found)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def name(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int) -> np.ndarray:
        return load_image(self.paths[index])


def _skip(err: DelvmError) -> None:
    warnings.warn(f"skipped {err}", stacklevel=3)


def to_pixels(batch: Tensor, device: torch.device) -> Tensor:
    """uint8 [B, H, W, 3] from the loader -> float [B, 3, H, W] in [0, 1] on `device`."""
    return batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)


class PixelAugment:
    """RandAugment, then random erasing, of one image (kornia's, as timm applies them per image).

    ``ops`` operations of kornia's RandAugment policy at ``magnitude`` on timm's 0..10 scale
    (kornia's m is 3x that, on 0..30); 0 ops: none. Random erasing (``erase_prob``) fills a box
    of 2-33 % of the image, aspect 0.3-3.3, with mid-grey 0.5 (kornia fills with one constant).
    """

    def __init__(self, ops: int = 0, magnitude: int = 9, erase_prob: float = 0.0):
        self.steps = []
        if ops:
            from kornia.augmentation.auto import RandAugment  # seconds to import: only if used

            self.steps.append(RandAugment(n=ops, m=3 * magnitude))
        if erase_prob:
            from kornia.augmentation import RandomErasing

            self.steps.append(RandomErasing(p=erase_prob, value=0.5))

    def __call__(self, image: np.ndarray, seed: list[int]) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [H, W, 3]; the draws are a function of ``seed`` alone."""
        if not self.steps:
            return image
        x = torch.tensor(image).permute(2, 0, 1)[None].float().div_(255)  # a copy: may be read-only
        with torch.random.fork_rng(devices=[]):  # kornia draws from torch's global generator
            torch.manual_seed(int(np.random.default_rng(seed).integers(2**63)))
            for step in self.steps:
                x = step(x)
        return x[0].permute(1, 2, 0).clamp_(0, 1).mul_(255).round_().to(torch.uint8).numpy()


class TrainSamples(Dataset):
    """Sample k of a run -> (augmented image uint8 [size, size, 3], label)."""

    def __init__(
        self,
        images: LabelledImages,
        augment: AugmentConfig,
        seed: int,
        pixels: PixelAugment | None = None,
    ):
        self.images, self.augment, self.seed = images, augment, seed
        self.pixels = pixels or PixelAugment()
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The images' shuffled order in `epoch` (each image once per epoch)."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(len(self.images))
        return self._order

    def __getitem__(self, k: int) -> tuple[Tensor, int]:
        count = len(self.images)
        epoch, position = divmod(k, count)
        order = self.order(epoch)
        for offset in range(count):
            index = int(order[(position + offset) % count])
            try:
                image = self.images.load(index)
                break
            except DelvmError as err:
                _skip(err)
        else:
            raise DelvmError(
                f"no image of the training set could be read ({self.images.name(0)}, ...)"
            )
        rng = np.random.default_rng([self.seed, k, 1])
        params = sample_crop(image.shape[0], image.shape[1], self.augment, rng)
        image = crop_resize(image, params, self.augment.size, nearest=False)
        image = self.pixels(image, [self.seed, k, 3])
        return torch.tensor(image), self.images.label(index)  # a copy: Pillow's is read-only


class EvalSamples(Dataset):
    """Image i -> (centre crop uint8 [size, size, 3], label, readable); unreadable: zeros."""

    def __init__(self, images: LabelledImages, size: int, crop: float):
        if not 0 < crop <= 1:
            raise DelvmError(f"data.eval_crop {crop}: a fraction in (0, 1], e.g. 0.875")
        self.images, self.size, self.crop = images, size, crop

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int, bool]:
        label = self.images.label(index)
        try:
            image = self.images.load(index)
        except DelvmError as err:
            _skip(err)
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), label, False
        # The central `crop` of the shorter side, resized: the usual "resize to size / crop,
        # centre crop size" evaluation (0.875: 256 -> 224), with one resampling instead of two.
        height, width = image.shape[:2]
        side = max(1, round(min(height, width) * self.crop))
        params = CropParams((height - side) // 2, (width - side) // 2, side, side)
        image = crop_resize(image, params, self.size, nearest=False)
        return torch.tensor(image), label, True


class StepBatches(Sampler[list[int]]):
    """This rank's sample numbers for each optimizer step from `start` to `steps` (exclusive)."""

    def __init__(self, start: int, steps: int, batch: int, rows: range):
        self.start, self.steps, self.batch, self.rows = start, steps, batch, rows

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield [step * self.batch + row for row in self.rows]
