"""The toy world: deterministic, long-tailed, learnable examples of the paper's three tasks."""

import json
from dataclasses import replace

import numpy as np
import pytest

from delvm.cli import main
from delvm.data.augment import AugmentConfig, augment_example
from delvm.data.render import decode_skeleton
from delvm.data.sources import SOURCES
from delvm.data.toyworld import (
    TASKS,
    ToyWorldConfig,
    iter_toyworld,
    recognition_set,
    toyworld_example,
)
from delvm.errors import DelvmError


def pck(predicted, truth, alpha=0.2):
    box = truth[:, :2].max(axis=0) - truth[:, :2].min(axis=0)
    error = np.linalg.norm(predicted[:, :2] - truth[:, :2], axis=1)
    return float(np.mean((predicted[:, 2] > 0) & (error <= alpha * box.max())))


def test_defaults_are_long_tailed():
    counts = ToyWorldConfig().counts()
    assert counts["segmentation"] >= 20 * counts["pose"]
    assert counts["segmentation"] >= 20 * counts["derain"]


def test_deterministic_by_seed_and_index():
    config = ToyWorldConfig(resolution=32, segmentation=3, pose=2, derain=2)
    first, second = list(iter_toyworld(config)), list(iter_toyworld(config))
    assert [e.task for e in first] == ["segmentation"] * 3 + ["pose"] * 2 + ["derain"] * 2
    for a, b in zip(first, second, strict=True):
        assert a.source == b.source
        for x, y in zip(a.images, b.images, strict=True):
            np.testing.assert_array_equal(x, y)
    # Any example on its own equals its place in the stream.
    np.testing.assert_array_equal(toyworld_example(config, "pose", 1).images[0], first[4].images[0])
    other = toyworld_example(ToyWorldConfig(seed=1, resolution=32), "segmentation", 0)
    assert not np.array_equal(other.images[0], first[0].images[0])


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_examples_are_well_formed_at_any_resolution(resolution):
    config = ToyWorldConfig(resolution=resolution)
    for task in TASKS:
        for index in range(3):
            example = toyworld_example(config, task, index)
            assert example.task == task and len(example.images) == 2
            for image in example.images:
                assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8


def test_targets_are_never_blank_and_tasks_look_different():
    config = ToyWorldConfig(resolution=64)
    black = {task: [] for task in TASKS}
    for task in TASKS:
        for index in range(40):
            example = toyworld_example(config, task, index)
            source, target = example.images
            black[task].append(np.mean(target.max(axis=2) == 0))
            assert source.std() > 10  # never a flat image
            if task == "segmentation":
                colours = np.unique(target.reshape(-1, 3), axis=0)
                assert 2 <= len(colours) <= 4  # black + 1..3 instances
                for colour in colours[colours.max(axis=1) > 0]:
                    assert np.mean((target == colour).all(axis=2)) >= 0.03  # large instances
            elif task == "pose":
                assert pck(decode_skeleton(target), example.keypoints[0]) == 1.0
                assert (example.keypoints[0, :, :2] >= 0).all()
                assert (example.keypoints[0, :, :2] < 64).all()
            else:
                streaks = np.abs(source.astype(int) - target).max(axis=2) > 30
                assert 0.02 < streaks.mean() < 0.4  # bold but sparse rain
                assert source[streaks].mean() > target[streaks].mean()  # rain is bright
    # Segmentation maps mostly coloured, skeleton maps mostly black, derained photos not black.
    assert np.mean(black["segmentation"]) < 0.8
    assert np.mean(black["pose"]) > 0.6
    assert np.mean(black["derain"]) < 0.05


def test_augmented_pose_keeps_its_colour_code():
    example = toyworld_example(ToyWorldConfig(resolution=128), "pose", 0)
    out = augment_example(example, AugmentConfig(size=64, scale=(0.8, 1.0), hflip=1.0), seed=0)
    visible = out.keypoints[0, :, 2] > 0
    decoded = decode_skeleton(out.images[1])
    assert visible.sum() >= 12
    assert pck(decoded[visible], out.keypoints[0][visible]) == 1.0


def test_bad_config_is_a_clear_error():
    with pytest.raises(DelvmError, match="resolution"):
        ToyWorldConfig(resolution=16)
    with pytest.raises(DelvmError, match="pose count"):
        ToyWorldConfig(pose=-1)


def test_cli_writes_paired_folders_the_paired_source_reads_back(tmp_path, capsys):
    out = tmp_path / "world"
    args = ["data", "toyworld", str(out), "--resolution", "32", "--seed", "3"]
    assert main(args + ["--segmentation", "4", "--pose", "2", "--derain", "2"]) == 0
    assert "segmentation 4, pose 2, derain 2" in capsys.readouterr().out
    summary = json.loads((out / "toyworld.json").read_text())
    config = ToyWorldConfig(seed=3, resolution=32, segmentation=4, pose=2, derain=2)
    assert summary["config"] == vars(config)
    for task in TASKS:
        source = dict(summary["tasks"][task]["source"])
        read = list(SOURCES[source.pop("format")](**source))
        assert len(read) == config.counts()[task]
        for index, example in enumerate(read):
            original = toyworld_example(config, task, index)
            assert example.task == task and example.meta["nearest"] == original.meta["nearest"]
            for a, b in zip(example.images, original.images, strict=True):
                np.testing.assert_array_equal(a, b)  # lossless PNG
            if task == "pose":
                np.testing.assert_allclose(example.keypoints, original.keypoints, atol=1e-3)
                assert example.meta["skeleton"] == 1
    # A second run into the same folder refuses instead of mixing two worlds.
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err


def test_mixed_scenes_share_one_input_with_a_truth_per_task():
    scenes = recognition_set(ToyWorldConfig(resolution=64), 6)
    assert sorted(scenes) == sorted(TASKS)
    for i in range(6):
        query = scenes["segmentation"][i].images[0]
        assert all(np.array_equal(scenes[t][i].images[0], query) for t in TASKS)
        segmentation, pose, clean = (scenes[t][i].images[1] for t in TASKS)
        # The rain is the difference between the input and the clean truth.
        assert np.abs(query.astype(int) - clean).mean() > 2
        # Every joint lies on a segmented pixel (the figure is an instance) and decodes back.
        keypoints = scenes["pose"][i].keypoints[0]
        x, y = np.clip(keypoints[:, :2].astype(int), 0, 63).T
        assert segmentation[y, x].any(axis=1).all()
        assert pose.any(axis=2).mean() < segmentation.any(axis=2).mean()
    again = recognition_set(ToyWorldConfig(resolution=64), 2)
    assert np.array_equal(again["pose"][1].images[0], scenes["pose"][1].images[0])


def test_mixed_share_changes_only_the_examples_it_draws():
    plain, mixed = ToyWorldConfig(), ToyWorldConfig(mixed=0.5)
    changed = 0
    for task in TASKS:
        for index in range(20):
            a, b = toyworld_example(plain, task, index), toyworld_example(mixed, task, index)
            same = all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))
            changed += not same
            if not same:  # a mixed input holds a figure and rain, whatever the task
                assert b.task == task and b.images[1].shape == a.images[1].shape
    assert 15 <= changed <= 45  # about half of 60
    with pytest.raises(DelvmError, match="mixed"):
        ToyWorldConfig(mixed=1.5)


def _background_roughness(example) -> float:
    """Mean absolute difference between horizontal neighbours that are both background (black in
    the segmentation target): stripes, checks and noise score high, gradients near zero."""
    image, background = example.images[0].astype(float), ~example.images[1].any(axis=2)
    both = background[:, 1:] & background[:, :-1]
    return float(np.abs(np.diff(image, axis=1)).sum(axis=2)[both].mean())


def test_untextured_world_has_flat_fills_and_no_photos(monkeypatch, tmp_path):
    import delvm.data.toyworld as toyworld

    textured, flat = ToyWorldConfig(), ToyWorldConfig(textures=False)
    rough = {
        config.textures: [
            _background_roughness(toyworld_example(config, "segmentation", i)) for i in range(30)
        ]
        for config in (textured, flat)
    }
    assert np.mean(rough[False]) < 0.2 * np.mean(rough[True])
    monkeypatch.setattr(toyworld, "_photo_crop", lambda *args: pytest.fail("photo drawn"))
    for task in TASKS:
        for index in range(30):
            example = toyworld_example(replace(flat, mixed=0.3), task, index)
            assert example.images[1].any()
    assert main(["data", "toyworld", str(tmp_path / "w"), "--segmentation", "2", "--pose", "1",
                 "--derain", "1", "--no-textures", "--rain", "2"]) == 0  # fmt: skip
    written = json.loads((tmp_path / "w" / "toyworld.json").read_text())["config"]
    assert written["textures"] is False and written["rain"] == 2


def test_rain_density_scales_the_streaks():
    def rain_share(config: ToyWorldConfig) -> float:
        examples = [toyworld_example(config, "derain", i) for i in range(20)]
        return np.mean([(np.abs(e.images[0].astype(int) - e.images[1]).max(axis=2) > 30).mean()
                        for e in examples])  # fmt: skip

    light, heavy = ToyWorldConfig(textures=False), ToyWorldConfig(textures=False, rain=2)
    assert 1.5 * rain_share(light) < rain_share(heavy) < 2.5 * rain_share(light)
    clean = [toyworld_example(c, "derain", 3).images[1] for c in (light, heavy)]
    np.testing.assert_array_equal(*clean)  # the scene is the same; only the rain differs
    with pytest.raises(DelvmError, match="rain"):
        ToyWorldConfig(rain=0)


def test_foreground_segmentation_targets_are_the_instances_in_white(tmp_path):
    instances = ToyWorldConfig(textures=False, mixed=0.5)
    foreground = replace(instances, segmentation_target="foreground")
    for index in range(12):  # plain and mixed scenes
        a = toyworld_example(instances, "segmentation", index)
        b = toyworld_example(foreground, "segmentation", index)
        np.testing.assert_array_equal(a.images[0], b.images[0])  # the same scene
        expected = np.where(a.images[1].any(axis=2, keepdims=True), 255, 0)
        np.testing.assert_array_equal(b.images[1], np.broadcast_to(expected, b.images[1].shape))
    # Only the segmentation answer changes: pose and derain are drawn as before.
    for task in ("pose", "derain"):
        for a, b in zip(toyworld_example(instances, task, 1).images,
                        toyworld_example(foreground, task, 1).images, strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)
    with pytest.raises(DelvmError, match="segmentation_target"):
        ToyWorldConfig(segmentation_target="semantic")
    out = tmp_path / "world"
    args = ["data", "toyworld", str(out), "--segmentation", "2", "--pose", "0", "--derain", "0"]
    assert main(args + ["--segmentation-target", "foreground"]) == 0
    summary = json.loads((out / "toyworld.json").read_text())
    assert summary["config"]["segmentation_target"] == "foreground"
