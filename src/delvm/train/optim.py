"""AdamW and the paper's learning-rate schedule (linear warmup, cosine down to a floor)."""

from __future__ import annotations

import math

import torch
from torch import nn

from delvm.train.config import OptimSection


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings' gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


def cosine_lr(step: int, total: int, optim: OptimSection) -> float:
    """lr at optimizer step ``step`` (0-based) of ``total``: warmup, then cosine to min_lr."""
    warmup = max(1, round(optim.warmup_ratio * total))
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def stage_lr(
    step: int,
    stage_bounds: list[tuple[int, int]],
    policy: str,
    optim: OptimSection,
    stage_optims: list[OptimSection] | None = None,
) -> float:
    """Continual learning (paper Table 10): one cosine over all stages (``continue``) or a fresh
    warmup + cosine inside each stage (``rescale``). ``stage_bounds``: [(first_step, steps)];
    ``stage_optims``: each stage's settings under ``rescale`` (its own lr / min_lr), else
    ``optim`` for every stage."""
    if policy == "continue":
        return cosine_lr(step, sum(n for _, n in stage_bounds), optim)
    per_stage = stage_optims or [optim] * len(stage_bounds)
    for (first, steps), settings in zip(stage_bounds, per_stage, strict=True):
        if step < first + steps:
            return cosine_lr(step - first, steps, settings)
    return per_stage[-1].min_lr
