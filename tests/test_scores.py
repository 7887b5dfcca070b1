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
    query_iou,
    recognised,
)


def test_foreground_mask_is_bar_et_al_rounding_to_the_nearer_of_white_and_black():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image[0, :2] = [(255, 128, 0), (255, 127, 0)]  # channel means 127.67 and 127.33
    pixels = image.astype(np.int64)
    # Bar et al.'s round_image: each pixel becomes the nearer (squared distance) of the two.
    nearer_white = ((pixels - 255) ** 2).sum(axis=2) < (pixels**2).sum(axis=2)
    np.testing.assert_array_equal(foreground_mask(image), nearer_white)
    assert foreground_mask(image)[0, :2].tolist() == [True, False]
    grey = np.array([[(90, 90, 90), (20, 20, 20)]], np.uint8)  # 90: above 0.25 of white, below 0.5
    assert foreground_mask(grey, 0.25).tolist() == [[True, False]]
    assert foreground_mask(grey, 0.05).tolist() == [[True, True]]
    assert not foreground_mask(grey).any()


def test_query_iou_by_hand():
    predicted, truth = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    predicted[:2] = True  # 8 pixels
    truth[1:3] = True  # 8 pixels, 4 shared
    assert query_iou(predicted, truth) == 4 / 12
    assert query_iou(truth, truth) == 1.0
    assert query_iou(np.zeros_like(truth), np.zeros_like(truth)) == 1.0  # nothing to find
    assert query_iou(np.zeros_like(truth), truth) == 0.0


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


# COCO's per-keypoint OKS constants (pycocotools' COCOeval.Params.kpt_oks_sigmas).
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87,
                        .87, .89, .89]) / 10  # fmt: skip


def test_coco_ap_through_cocoeval():
    truth = keypoints(4)
    assert coco_keypoint_ap(truth.copy(), truth, (100, 100)) == pytest.approx(1.0)
    wrong = keypoints(4, seed=1)
    assert coco_keypoint_ap(wrong, truth, (100, 100)) < 0.2


def test_coco_ap_scales_oks_by_the_keypoints_box():
    """One person, every joint moved d px: OKS = mean_i exp(-d^2 / (2 s^2 (2 sigma_i)^2)) with
    s^2 the area of the visible keypoints' box, and AP is the share of COCO's ten OKS thresholds
    (0.50, 0.55, ..., 0.95) that it reaches."""
    truth = keypoints(1)
    width, height = truth[0, :, :2].max(0) - truth[0, :, :2].min(0)
    thresholds = np.linspace(0.5, 0.95, 10)
    for d in (3.0, 4.0, 7.0):
        oks = np.mean(np.exp(-(d**2) / (2 * width * height * (2 * COCO_SIGMAS) ** 2)))
        assert np.abs(thresholds - oks).min() > 0.01  # clear of a threshold: no rounding luck
        moved = truth.copy()
        moved[..., 0] += d
        expected = np.mean(thresholds <= oks)
        assert coco_keypoint_ap(moved, truth, (100, 100)) == pytest.approx(expected), d


def ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 on [0, 1] images [H, W, C]: 11 x 11 Gaussian window (sigma 1.5), K1 0.01,
    K2 0.03, data range 1; the SSIM map at every pixel (borders reflected, as torchmetrics does,
    where skimage would crop them), averaged."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / g.sum() ** 2

    def local_mean(a: np.ndarray) -> np.ndarray:
        a = np.pad(a, ((5, 5), (5, 5), (0, 0)), mode="reflect")
        patches = np.lib.stride_tricks.sliding_window_view(a, (11, 11), axis=(0, 1))
        return (patches * window).sum((-2, -1))

    mx, my = local_mean(x), local_mean(y)
    vx, vy, cov = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ssim = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim.mean())


def test_psnr_and_ssim_against_a_direct_computation():
    rng = np.random.default_rng(0)
    # Low contrast, so the SSIM sits mid-range where the window and the data range show.
    clean = [rng.integers(100, 140, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    noisy = [np.clip(c + rng.normal(0, 10, c.shape), 0, 255).astype(np.uint8) for c in clean]
    scores = psnr_ssim(noisy, clean)
    direct = np.mean([10 * np.log10(1 / np.mean(((n / 255.0) - (c / 255.0)) ** 2))
                      for n, c in zip(noisy, clean, strict=True)])  # fmt: skip
    assert scores["psnr"] == pytest.approx(direct, rel=1e-4)
    by_hand = np.mean(
        [ssim_by_hand(n / 255.0, c / 255.0) for n, c in zip(noisy, clean, strict=True)]
    )
    assert scores["ssim"] == pytest.approx(by_hand, abs=1e-5)
    assert psnr_ssim(clean, clean)["ssim"] == pytest.approx(1.0)


def test_task_recognition_picks_the_nearest_truth():
    truths = {"a": np.zeros((4, 4, 3)), "b": np.full((4, 4, 3), 255.0)}
    outputs = {"a": np.full((4, 4, 3), 30.0), "b": np.full((4, 4, 3), 40.0)}
    assert recognised(outputs, truths) == {"a": True, "b": False}
