"""Paired augmentation: one crop and flip for every image of an example, and its keypoints."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from delvm.data.augment import (
    AugmentConfig,
    CropParams,
    augment_example,
    crop_resize,
    move_keypoints,
    resize_example,
    sample_crop,
)
from delvm.data.example import Example
from delvm.data.render import COCO_FLIP, decode_skeleton, render_instances, render_skeleton
from delvm.data.toyworld import ToyWorldConfig, toyworld_example
from delvm.errors import DelvmError


def smooth_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(6 * x * rng.uniform(1, 3) + 4 * y * rng.uniform(1, 3) + k) for k in range(3)]
    return ((np.stack(channels, axis=2) + 1) * 127.5).astype(np.uint8)


def instance_masks(height: int, width: int) -> list[np.ndarray]:
    """Three instances, one nested in another, one apart."""
    y, x = np.mgrid[0:height, 0:width]
    big = (np.abs(x - 0.4 * width) < 0.3 * width) & (np.abs(y - 0.5 * height) < 0.35 * height)
    inner = (x - 0.35 * width) ** 2 + (y - 0.5 * height) ** 2 < (0.12 * height) ** 2
    apart = (x > 0.8 * width) & (y < 0.3 * height)
    return [big, inner, apart]


def torch_crop_resize(image, params, size, mode):
    """The same crop through PyTorch's own kernels: an independent reference."""
    crop = image[params.top : params.top + params.height, params.left : params.left + params.width]
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float()
    if mode == "bilinear":
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    else:
        x = F.interpolate(x, size=(size, size), mode="nearest-exact")
    if params.flip:
        x = x.flip(-1)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


@pytest.mark.parametrize("size", [48, 64, 300])
def test_resampling_matches_pytorch(size):
    photo = smooth_photo(180, 250)
    codes = np.kron(np.random.default_rng(1).integers(0, 256, (18, 25, 3)), np.ones((10, 10, 1)))
    codes = codes.astype(np.uint8)
    for params in (CropParams(7, 31, 150, 170, True), CropParams(0, 0, 180, 250, False)):
        ours = crop_resize(photo, params, size, nearest=False)
        reference = torch_crop_resize(photo, params, size, "bilinear")
        assert np.abs(ours.astype(int) - reference).max() <= 1
        ours = crop_resize(codes, params, size, nearest=True)
        np.testing.assert_array_equal(ours, torch_crop_resize(codes, params, size, "nearest"))


def test_sample_crop_respects_config_and_seed():
    config = AugmentConfig(size=32, scale=(0.3, 0.6), ratio=(0.5, 2.0), hflip=0.5)
    crops = [sample_crop(120, 200, config, np.random.default_rng(s)) for s in range(200)]
    for c in crops:
        assert c.top >= 0 and c.left >= 0
        assert c.top + c.height <= 120 and c.left + c.width <= 200
        assert 0.27 <= c.height * c.width / (120 * 200) <= 0.63
        assert 0.45 <= c.width / c.height <= 2.2
    assert 60 < sum(c.flip for c in crops) < 140
    assert sample_crop(120, 200, config, np.random.default_rng(5)) == crops[5]
    # No crop of that area and aspect fits a 1000x10 strip: centre crop within the ratio range.
    strip = sample_crop(10, 1000, config, np.random.default_rng(0))
    assert (strip.height, strip.width, strip.left) == (10, 20, 490)


def test_same_parameters_for_every_image_and_deterministic_by_seed():
    photo = smooth_photo(90, 140)
    example = Example("t", [photo, photo.copy(), photo.copy()], "x", meta={})
    config = AugmentConfig(size=40)
    out = augment_example(example, config, seed=3)
    assert all(image.shape == (40, 40, 3) for image in out.images)
    np.testing.assert_array_equal(out.images[0], out.images[1])
    np.testing.assert_array_equal(out.images[0], out.images[2])
    np.testing.assert_array_equal(out.images[0], augment_example(example, config, 3).images[0])
    others = [augment_example(example, config, s).images[0] for s in range(4, 8)]
    assert not all(np.array_equal(out.images[0], o) for o in others)


def as_image(mask: np.ndarray) -> np.ndarray:
    return np.repeat(mask[..., None], 3, axis=2).astype(np.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_pair_alignment_instances(seed):
    """A target rendered from the augmented masks equals the augmented rendered target."""
    height, width = 96, 150
    masks = instance_masks(height, width)
    photo = smooth_photo(height, width)
    example = Example(
        "seg", [photo, render_instances(masks, seed=11)], "x", meta={"nearest": [False, True]}
    )
    config = AugmentConfig(size=64, scale=(0.2, 1.0), hflip=0.5)
    out = augment_example(example, config, seed)

    params = sample_crop(height, width, config, np.random.default_rng(seed))
    moved = [crop_resize(as_image(m), params, 64, nearest=True)[..., 0] > 0 for m in masks]
    np.testing.assert_array_equal(out.images[1], render_instances(moved, seed=11))
    np.testing.assert_array_equal(out.images[0], crop_resize(photo, params, 64, nearest=False))


def test_pair_alignment_keypoints_with_flip_swaps_left_and_right():
    """Keypoints follow the pixels: drawn into the input, decoded after augmentation."""
    pose = toyworld_example(ToyWorldConfig(resolution=128), "pose", 2)
    marks = render_skeleton(pose.keypoints, 128, 128)  # joints as colour blobs in the input
    example = Example(
        "pose",
        [marks, pose.images[1]],
        "x",
        pose.keypoints,
        {"nearest": [True, True], "skeleton": 1},
    )
    config = AugmentConfig(size=96, scale=(0.9, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    out = augment_example(example, config, seed=0)
    moved = out.keypoints[0]
    # Pixels mirrored: the blob coloured for joint j now sits where the flipped person has
    # joint COCO_FLIP[j], which is what the flipped keypoints say.
    seen = decode_skeleton(out.images[0])
    visible = moved[:, 2] > 0
    for joint in np.flatnonzero(visible):
        partner = COCO_FLIP[joint]
        if seen[partner, 2]:
            assert np.linalg.norm(seen[partner, :2] - moved[joint, :2]) < 96 / 16
    # The target is redrawn from the moved keypoints, so its colour code stays right.
    np.testing.assert_array_equal(out.images[1], render_skeleton(out.keypoints, 96, 96))
    assert (
        np.mean(
            np.linalg.norm(decode_skeleton(out.images[1])[visible, :2] - moved[visible, :2], axis=1)
        )
        < 1.5
    )


def test_keypoints_follow_crop_and_leave_it_unlabelled():
    keypoints = np.zeros((1, 17, 3))
    keypoints[0] = (10, 20, 2)
    keypoints[0, 3] = (90, 90, 2)  # outside the crop below
    keypoints[0, 4] = (30, 30, 0)  # never labelled
    moved = move_keypoints(keypoints, CropParams(top=10, left=5, height=50, width=50), 25)
    assert tuple(moved[0, 0]) == (2.5, 5, 2)
    assert tuple(moved[0, 3]) == (0, 0, 0) and tuple(moved[0, 4]) == (0, 0, 0)
    flipped = move_keypoints(keypoints, CropParams(10, 5, 50, 50, flip=True), 25)
    assert tuple(flipped[0, COCO_FLIP[0]]) == (25 - 2.5, 5, 2)


def test_resize_example_is_centre_crop_for_all_images():
    photo = smooth_photo(80, 120)
    example = Example("t", [photo, photo], "x", meta={"nearest": [False, True]})
    out = resize_example(example, 40)
    centre = photo[:, 20:100]
    expected = np.asarray(Image.fromarray(centre).resize((40, 40), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out.images[0], expected)
    expected = np.asarray(Image.fromarray(centre).resize((40, 40), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(out.images[1], expected)


@pytest.mark.parametrize(
    "bad",
    [
        {"scale": (0.0, 1.0)},
        {"scale": (0.8, 0.5)},
        {"ratio": (2.0, 1.0)},
        {"hflip": 1.5},
        {"size": 0},
    ],
)
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(DelvmError):
        AugmentConfig(**bad)
