"""Top-1 / top-5 accuracy and loss of a classifier on a labelled image set (centre crops)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from delvm.classify.data import EvalSamples, LabelledImages, to_pixels
from delvm.classify.model import VisualClassifier
from delvm.errors import DelvmError
from delvm.train.distributed import World


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k.

    With fewer classes than k, top-k counts every row (as torchmetrics does).
    """
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices  # [B, k]
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(dim=-1).sum()) for k in ks}


@torch.no_grad()
def evaluate(
    model: VisualClassifier,
    images: LabelledImages,
    crop: float,
    batch: int,
    workers: int,
    world: World,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict:
    """top1 / top5 (%), mean cross-entropy and counts over `images`, split across ranks.

    `model` is the bare classifier (not a DDP wrapper): evaluation needs no gradient sync.
    """
    samples = EvalSamples(images, model.config.image_size, crop)
    shard = Subset(samples, range(world.rank, len(samples), world.size))
    loader = DataLoader(shard, batch_size=batch, num_workers=workers)
    # images, top-1 hits, top-5 hits, summed loss, unreadable images
    totals = torch.zeros(5, dtype=torch.float64, device=world.device)
    was_training = model.training
    model.eval()
    for pixels, labels, readable in loader:
        totals[4] += int((~readable).sum())
        pixels, labels = pixels[readable], labels[readable].to(world.device)
        if not len(labels):
            continue
        with autocast or contextlib.nullcontext():
            logits = model(to_pixels(pixels, world.device)).float()
        hits = topk_correct(logits, labels)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        totals[:4] += torch.stack([totals.new_tensor(len(labels)), totals.new_tensor(hits[1]),
                                   totals.new_tensor(hits[5]), loss.double()])  # fmt: skip
    model.train(was_training)
    if world.size > 1:
        dist.all_reduce(totals)
    count, top1, top5, loss, skipped = totals.tolist()
    if count == 0:
        raise DelvmError(f"no readable image in the evaluation set ({images.name(0)}, ...)")
    return {
        "top1": 100 * top1 / count,
        "top5": 100 * top5 / count,
        "loss": loss / count,
        "images": int(count),
        "skipped": int(skipped),
    }
