"""Reconstruction quality and codebook usage, as the training report and `reconstruct` print them."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def psnr(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1] ([B, C, H, W] -> [B]); capped at 100 dB."""
    mse = (reference.float() - reconstruction.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def codebook_usage(counts: Tensor) -> dict[str, float]:
    """From per-code counts: fraction of codes used and the perplexity of the code distribution
    (exp entropy: the number of equally used codes it is worth)."""
    total = counts.sum().clamp_min(1)
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "used_codes": int((counts > 0).sum()),
        "usage": float((counts > 0).float().mean()),
        "perplexity": math.exp(entropy),
    }
