import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryJaccardIndex

from delvm.evaluation.scores import (
    FoldIoU,
    coco_keypoint_ap,
    foreground_mask,
    pck,
    psnr_ssim,
    recognised,
)


def test_foreground_mask_uses_a_low_grayscale_threshold():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = 255
    image[0, 1] = (90, 90, 90)  # dim grey: above a 0.25 threshold, below 0.5
    image[1, 2] = (20, 20, 20)
    assert foreground_mask(image, 0.25).tolist() == [[True, True, False], [False, False, False]]
    assert foreground_mask(image, 0.5).sum() == 1


def test_fold_iou_matches_torchmetrics_per_class():
    rng = np.random.default_rng(0)
    fold, reference = FoldIoU(), {1: BinaryJaccardIndex(), 2: BinaryJaccardIndex()}
    for episode in range(12):
        class_id = 1 + episode % 2
        predicted, truth = rng.random((16, 16)) > 0.5, rng.random((16, 16)) > 0.6
        fold.add(class_id, predicted, truth)
        reference[class_id].update(torch.from_numpy(predicted).int(), torch.from_numpy(truth).int())
    for class_id, iou in fold.per_class().items():
        assert iou == pytest.approx(reference[class_id].compute().item(), abs=1e-6)
    assert fold.miou() == pytest.approx(np.mean(list(fold.per_class().values())))


def keypoints(n=3, seed=0):
    rng = np.random.default_rng(seed)
    kp = np.zeros((n, 17, 3))
    kp[..., :2] = rng.uniform(10, 90, (n, 17, 2))
    kp[..., 2] = 2
    return kp


def test_pck_counts_joints_within_a_fifth_of_the_box():
    truth = keypoints()
    assert pck(truth.copy(), truth) == 1.0
    far = truth.copy()
    far[..., 0] += 1000
    assert pck(far, truth) == 0.0
    size = (truth[0, :, :2].max(0) - truth[0, :, :2].min(0)).max()
    near = truth[:1].copy()
    near[0, :8, 0] += 0.19 * size  # inside 0.2 x box
    near[0, 8:, 0] += 0.21 * size  # outside
    assert pck(near, truth[:1]) == pytest.approx(8 / 17)
    missing = truth.copy()
    missing[:, :, 2] = 0  # predicted absent: wrong even at the right place
    assert pck(missing, truth) == 0.0


def test_coco_ap_through_cocoeval():
    truth = keypoints(4)
    assert coco_keypoint_ap(truth.copy(), truth, (100, 100)) == pytest.approx(1.0)
    wrong = keypoints(4, seed=1)
    assert coco_keypoint_ap(wrong, truth, (100, 100)) < 0.2


def test_psnr_and_ssim_against_a_direct_computation():
    rng = np.random.default_rng(0)
    clean = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    noisy = [np.clip(c + rng.normal(0, 10, c.shape), 0, 255).astype(np.uint8) for c in clean]
    scores = psnr_ssim(noisy, clean)
    direct = np.mean([10 * np.log10(1 / np.mean(((n / 255.0) - (c / 255.0)) ** 2))
                      for n, c in zip(noisy, clean, strict=True)])  # fmt: skip
    assert scores["psnr"] == pytest.approx(direct, rel=1e-4)
    assert 0 < scores["ssim"] < 1
    assert psnr_ssim(clean, clean)["ssim"] == pytest.approx(1.0)


def test_task_recognition_picks_the_nearest_truth():
    truths = {"a": np.zeros((4, 4, 3)), "b": np.full((4, 4, 3), 255.0)}
    outputs = {"a": np.full((4, 4, 3), 30.0), "b": np.full((4, 4, 3), 40.0)}
    assert recognised(outputs, truths) == {"a": True, "b": False}
