"""Task scores for generated images — the numbers the papers leave as future work.

- Foreground segmentation (Pascal-5i): output -> binary mask (`foreground_mask`); IoU per query
  (Bar et al.'s mean over queries) and per class accumulated over a fold's episodes (`FoldIoU`).
- Pose: keypoints read back from a generated skeleton map (`delvm.data.render.decode_skeleton`);
  PCK@0.2 and COCO keypoint AP (pycocotools' COCOeval).
- Deraining: PSNR and SSIM against the clean image (torchmetrics).
- Task recognition: the same query under each task's prompt; an output counts when it is nearer
  to the prompted task's ground truth than to any other task's (the paper's Figure 8 claim).
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict

import numpy as np
import torch

# A generated pixel is foreground when its mean over R, G, B exceeds this share of white. 0.5 is
# the rule of Bar et al. (Visual Prompting, NeurIPS 2022), whose Pascal-5i protocol DeLVM follows:
# each pixel is rounded to the nearer of white and black.
FOREGROUND_THRESHOLD = 0.5


def foreground_mask(image: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> bool mask where the channel mean exceeds ``threshold`` (0..1).

    At 0.5: the pixels nearer white than black (no integer pixel is equally near both).
    """
    return image.astype(np.int64).sum(axis=2) > threshold * 3 * 255


def query_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """One query's IoU |P & T| / |P | T|; 1.0 when both masks are empty (nothing to find)."""
    predicted, truth = predicted.astype(bool), truth.astype(bool)
    union = int(np.logical_or(predicted, truth).sum())
    return int(np.logical_and(predicted, truth).sum()) / union if union else 1.0


class FoldIoU:
    """Class-wise IoU accumulated over episodes (intersections and unions summed per class)."""

    def __init__(self) -> None:
        self.intersection: dict[int, int] = defaultdict(int)
        self.union: dict[int, int] = defaultdict(int)

    def add(self, class_id: int, predicted: np.ndarray, truth: np.ndarray) -> None:
        predicted, truth = predicted.astype(bool), truth.astype(bool)
        self.intersection[class_id] += int(np.logical_and(predicted, truth).sum())
        self.union[class_id] += int(np.logical_or(predicted, truth).sum())

    def per_class(self) -> dict[int, float]:
        return {c: self.intersection[c] / max(1, self.union[c]) for c in sorted(self.union)}

    def miou(self) -> float:
        values = list(self.per_class().values())
        return float(np.mean(values)) if values else float("nan")


def pck(predicted: np.ndarray, truth: np.ndarray, alpha: float = 0.2) -> float:
    """Share of visible ground-truth joints predicted within alpha x the person's box size.

    predicted, truth: [N, 17, 3] (x, y, v); the box is the visible truth keypoints' extent
    (max of width and height). A joint predicted absent (v = 0) counts as wrong.
    """
    hits = total = 0
    for pred, gt in zip(predicted, truth, strict=True):
        visible = gt[:, 2] > 0
        if not visible.any():
            continue
        xy = gt[visible, :2]
        size = max(float((xy.max(0) - xy.min(0)).max()), 1.0)
        distance = np.linalg.norm(pred[visible, :2] - xy, axis=1)
        found = pred[visible, 2] > 0
        hits += int(((distance <= alpha * size) & found).sum())
        total += int(visible.sum())
    return hits / total if total else float("nan")


def coco_keypoint_ap(predicted: np.ndarray, truth: np.ndarray, size: tuple[int, int]) -> float:
    """COCO keypoint AP (OKS, pycocotools' COCOeval) of one person per image.

    predicted, truth: [N, 17, 3]; size: (height, width) of the images.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    height, width = size
    images, annotations, results = [], [], []
    for i, (pred, gt) in enumerate(zip(predicted, truth, strict=True)):
        visible = gt[:, 2] > 0
        xy = gt[visible, :2] if visible.any() else np.zeros((1, 2))
        x0, y0 = xy.min(0)
        w, h = np.maximum(xy.max(0) - xy.min(0), 1.0)
        images.append({"id": i, "height": height, "width": width})
        annotations.append({
            "id": i + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
            "keypoints": gt.astype(float).reshape(-1).tolist(), "num_keypoints": int(visible.sum()),
            "bbox": [float(x0), float(y0), float(w), float(h)], "area": float(w * h),
        })  # fmt: skip
        scored = pred.astype(float).copy()
        scored[:, 2] = (pred[:, 2] > 0).astype(float)
        results.append({"image_id": i, "category_id": 1, "score": 1.0,
                        "keypoints": scored.reshape(-1).tolist()})  # fmt: skip
    ground = COCO()
    ground.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": 1, "name": "person"}]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its whole table
        ground.createIndex()
        detections = ground.loadRes(results)
        evaluation = COCOeval(ground, detections, iouType="keypoints")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def _as_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def psnr_ssim(outputs: list[np.ndarray], clean: list[np.ndarray]) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of RGB uint8 outputs against clean references, in [0, 1] range."""
    # Imported here: torchmetrics takes seconds to import, and the CLI imports this module.
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    x, y = _as_batch(outputs), _as_batch(clean)
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(x, y, data_range=1.0)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim)}


def recognised(outputs: dict[str, np.ndarray], truths: dict[str, np.ndarray]) -> dict[str, bool]:
    """For one query: per prompted task, is its output nearest (MSE) to that task's truth?"""
    result = {}
    for task, output in outputs.items():
        errors = {
            t: float(((output.astype(float) - truth) ** 2).mean()) for t, truth in truths.items()
        }
        result[task] = min(errors, key=errors.get) == task
    return result
