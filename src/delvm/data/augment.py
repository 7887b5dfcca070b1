"""Paired augmentation: one random crop and flip shared by every image of an example.

The reference DeLVM code drew separate random transforms for an input and its target, so pairs
stopped lining up; here one `CropParams` is sampled per example (from a seed) and applied to each
image and to the keypoints.

A skeleton map is not resampled but drawn again from the moved keypoints: a flip swaps the
person's left and right, so the mirrored pixels would carry the wrong joint colours, and a
fresh drawing keeps limbs as thick as `render_skeleton` makes them at the output size. The
image drawn this way is `example.meta["skeleton"]` (its index; absent: none).

The other images are resampled as `example.meta["nearest"]` says (one bool per image; absent:
all False): photos bilinearly with antialiasing, colour-coded targets (instance colours,
foreground masks) with nearest so no new colours appear. Resampling is a crop then Pillow's
`resize`, as torchvision's RandomResizedCrop does; Pillow's BILINEAR widens its filter when
shrinking (antialiasing) and its NEAREST samples pixel centres, and the tests check both against
PyTorch's `interpolate`. Not kornia: its resize approximates antialiasing with a Gaussian blur,
and PyTorch's kernels, equal to Pillow's, spend more on thread start-up than on the work at
these image sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from delvm.data.example import Example
from delvm.data.render import COCO_FLIP, render_skeleton
from delvm.errors import DelvmError


@dataclass(frozen=True)
class AugmentConfig:
    """RandomResizedCrop + horizontal flip, torchvision's definitions.

    scale: range of the crop's area as a fraction of the image's. The paper (Table 8) uses
    torchvision's default (0.08, 1.0), as the shipped real-data config does; the default here
    keeps at least half the image, for small images (the toy world) whose dense targets lose
    their meaning on tiny crops.
    ratio: range of the crop's width / height, sampled log-uniformly.
    hflip: probability of a horizontal flip.
    size: side of the square output images.
    """

    size: int = 256
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise DelvmError(f"augment scale {self.scale}: need 0 < min <= max <= 1, e.g. (0.5, 1)")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise DelvmError(f"augment ratio {self.ratio}: need 0 < min <= max, e.g. (0.75, 1.33)")
        if not 0 <= self.hflip <= 1:
            raise DelvmError(f"augment hflip {self.hflip}: a probability in [0, 1]")
        if self.size < 1:
            raise DelvmError(f"augment size {self.size}: must be a positive number of pixels")


@dataclass(frozen=True)
class CropParams:
    """The crop box in source pixels (rows top..top+height, columns left..left+width), and flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False


def sample_crop(
    height: int, width: int, config: AugmentConfig, rng: np.random.Generator
) -> CropParams:
    """torchvision's RandomResizedCrop sampling: 10 tries of area and aspect, then a centre crop."""
    area = height * width
    log_ratio = np.log(config.ratio)
    flip = bool(rng.random() < config.hflip)
    for _ in range(10):
        target_area = area * rng.uniform(*config.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropParams(top, left, h, w, flip)
    # Fallback: the largest centre crop whose aspect lies within the ratio range.
    aspect = width / height
    if aspect < config.ratio[0]:
        w, h = width, round(width / config.ratio[0])
    elif aspect > config.ratio[1]:
        h, w = height, round(height * config.ratio[1])
    else:
        w, h = width, height
    return CropParams((height - h) // 2, (width - w) // 2, h, w, flip)


def centre_crop(height: int, width: int) -> CropParams:
    """The central square: with a resize, the same as 'shorter side to size, then centre crop'."""
    side = min(height, width)
    return CropParams((height - side) // 2, (width - side) // 2, side, side)


def crop_resize(image: np.ndarray, params: CropParams, size: int, nearest: bool) -> np.ndarray:
    """Crop `image` [H, W, 3] uint8 to `params`, resize to size x size, flip if asked."""
    crop = image[params.top : params.top + params.height, params.left : params.left + params.width]
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    out = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), resample)
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def move_keypoints(keypoints: np.ndarray, params: CropParams, size: int) -> np.ndarray:
    """Keypoints [..., 17, 3] through the same crop, resize and flip as the pixels.

    Coordinates are continuous (pixel j covers [j, j+1)); keypoints that leave the crop become
    (0, 0, 0) as COCO marks unlabelled joints; a flip also swaps left and right joints.
    """
    out = np.array(keypoints, dtype=np.float64)
    out[..., 0] = (out[..., 0] - params.left) * size / params.width
    out[..., 1] = (out[..., 1] - params.top) * size / params.height
    if params.flip:
        out[..., 0] = size - out[..., 0]
        out = out[..., list(COCO_FLIP), :]
    inside = (out[..., 0] >= 0) & (out[..., 0] < size) & (out[..., 1] >= 0) & (out[..., 1] < size)
    out[~(inside & (out[..., 2] > 0))] = 0
    return out


def _nearest_flags(example: Example) -> list[bool]:
    flags = example.meta.get("nearest", [False] * len(example.images))
    if len(flags) != len(example.images):
        raise ValueError(
            f"{example.source}: meta['nearest'] has {len(flags)} flags for "
            f"{len(example.images)} images"
        )
    return list(flags)


def apply_crop(example: Example, params: CropParams, size: int) -> Example:
    """The example with `params` applied to every image (and its keypoints)."""
    sizes = {image.shape[:2] for image in example.images}
    if len(sizes) != 1:
        raise ValueError(f"{example.source}: images of one example differ in size {sizes}")
    keypoints = None
    if example.keypoints is not None:
        keypoints = move_keypoints(example.keypoints, params, size)
    skeleton = example.meta.get("skeleton")
    if skeleton is not None and keypoints is None:
        raise ValueError(f"{example.source}: meta['skeleton'] is set but there are no keypoints")
    nearest = _nearest_flags(example)
    images = []
    for index, image in enumerate(example.images):
        if index == skeleton:
            images.append(render_skeleton(keypoints, size, size))
        else:
            images.append(crop_resize(image, params, size, nearest[index]))
    return replace(example, images=images, keypoints=keypoints, meta=dict(example.meta))


def augment_example(example: Example, config: AugmentConfig, seed: int) -> Example:
    """One RandomResizedCrop + flip, drawn from `seed`, applied alike to all images of `example`."""
    height, width = example.images[0].shape[:2]
    params = sample_crop(height, width, config, np.random.default_rng(seed))
    return apply_crop(example, params, config.size)


def resize_example(example: Example, size: int) -> Example:
    """The un-augmented copy: shorter side to `size`, centre crop, for all images and keypoints."""
    height, width = example.images[0].shape[:2]
    return apply_crop(example, centre_crop(height, width), size)
