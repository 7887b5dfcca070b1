"""Target rendering: instance colours, foreground masks, and the skeleton colour code."""

import itertools

import numpy as np
import pytest

from delvm.data.render import (
    COCO_FLIP,
    COCO_JOINTS,
    COCO_LIMBS,
    JOINT_COLOURS,
    LIMB_COLOURS,
    decode_skeleton,
    render_foreground,
    render_instances,
    render_skeleton,
)
from delvm.data.toyworld import ToyWorldConfig, toyworld_example

# The `skeleton` list of COCO's person_keypoints_*.json (1-based joint numbers).
COCO_JSON_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
    [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip


def pck(predicted: np.ndarray, truth: np.ndarray, alpha: float = 0.2) -> float:
    """Fraction of labelled joints within alpha x the longer side of the joints' box."""
    labelled = truth[:, 2] > 0
    box = truth[labelled, :2].max(axis=0) - truth[labelled, :2].min(axis=0)
    error = np.linalg.norm(predicted[labelled, :2] - truth[labelled, :2], axis=1)
    found = predicted[labelled, 2] > 0
    return float(np.mean(found & (error <= alpha * box.max())))


def test_skeleton_tables_follow_coco():
    assert len(COCO_JOINTS) == 17
    assert [[a + 1, b + 1] for a, b in COCO_LIMBS] == COCO_JSON_SKELETON
    for joint, partner in enumerate(COCO_FLIP):
        assert COCO_FLIP[partner] == joint
        name = COCO_JOINTS[joint]
        mirrored = name.replace("left", "#").replace("right", "left").replace("#", "right")
        assert COCO_JOINTS[partner] == mirrored


def test_colour_code_separates_joints_from_each_other_and_from_limbs():
    assert JOINT_COLOURS.shape == (17, 3) and LIMB_COLOURS.shape == (19, 3)
    assert set(np.unique(JOINT_COLOURS)) <= {0, 128, 255}
    assert (JOINT_COLOURS.max(axis=1) == 255).all()
    assert set(np.unique(LIMB_COLOURS)) <= {0, 64, 128}
    assert (LIMB_COLOURS.max(axis=1) == 128).all()
    for a, b in itertools.combinations(JOINT_COLOURS.astype(int), 2):
        assert np.abs(a - b).max() >= 127
    assert len({tuple(c) for c in LIMB_COLOURS}) == 19


@pytest.mark.parametrize("size", [64, 128, 256])
def test_render_then_decode_recovers_toyworld_poses(size):
    config = ToyWorldConfig(resolution=size)
    for index in range(12):
        example = toyworld_example(config, "pose", index)
        truth = example.keypoints[0]
        decoded = decode_skeleton(render_skeleton(truth[None], size, size))
        assert pck(decoded, truth) == 1.0
        # A joint's centroid is exact unless a neighbour's disc covers part of it (eyes and
        # ears under the nose, a hip under a hanging wrist): then it moves by < 1/16 side.
        error = np.linalg.norm(decoded[:, :2] - truth[:, :2], axis=1)
        assert np.median(error) < 0.01 * size + 0.5 and error.max() < size / 16


def test_decode_reports_absent_joints_and_survives_noise():
    config = ToyWorldConfig(resolution=64)
    truth = toyworld_example(config, "pose", 3).keypoints[0].copy()
    truth[[9, 16]] = 0  # left wrist and right ankle not labelled
    image = render_skeleton(truth[None], 64, 64)
    decoded = decode_skeleton(image)
    assert decoded[9, 2] == 0 and decoded[16, 2] == 0
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 12, image.shape), 0, 255)
    assert pck(decode_skeleton(noisy.astype(np.uint8)), truth) == 1.0
    assert (decode_skeleton(np.zeros((64, 64, 3), np.uint8))[:, 2] == 0).all()


def test_skeleton_draws_only_labelled_limbs():
    points = np.zeros((1, 17, 3))
    points[0, 5] = (10, 10, 2)  # left shoulder
    points[0, 7] = (10, 40, 2)  # left elbow; limb (5, 7) is drawn
    image = render_skeleton(points, 64, 64, joint_radius=3, limb_width=3)
    limb = tuple(LIMB_COLOURS[COCO_LIMBS.index((5, 7))])
    assert tuple(image[25, 10]) == limb
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {(0, 0, 0), limb, tuple(JOINT_COLOURS[5]), tuple(JOINT_COLOURS[7])}


def test_instances_seeded_colours_and_small_on_top():
    big = np.zeros((32, 32), bool)
    big[4:28, 4:28] = True
    small = np.zeros((32, 32), bool)
    small[10:14, 10:14] = True
    image = render_instances([small, big], seed=7)
    again = render_instances([small, big], seed=7)
    other = render_instances([small, big], seed=8)
    np.testing.assert_array_equal(image, again)
    assert not np.array_equal(image, other)
    colour_small, colour_big = image[12, 12], image[5, 5]
    assert not np.array_equal(colour_small, colour_big)
    assert (image[~big] == 0).all()
    # Painted, not summed: every pixel holds exactly one instance's colour (no uint8 wrap).
    assert (image[small] == colour_small).all() and (image[big & ~small] == colour_big).all()
    assert image[big].max(axis=1).min() >= 0.7 * 255 - 1  # bright, never confused with black


def test_foreground_is_white_on_black():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 1
    image = render_foreground(mask)
    assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
    assert (image[mask == 1] == 255).all() and (image[mask == 0] == 0).all()
