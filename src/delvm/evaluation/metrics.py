"""Next-token metrics per task, as the papers report them.

Validation loss (mean NLL), next-token accuracy (%) and perplexity = exp(mean NLL), each twice:
over every predicted token of the sentence (DeLVM's convention) and over the tokens of the last
image only, the answer a prompt asks for (LVM's perplexity).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

SCOPES = ("sentence", "target")


class TaskMetrics:
    """Accumulates NLL sums and hit counts per (task, scope); `result()` turns them into figures."""

    def __init__(self, target_tokens: int):
        self.target_tokens = target_tokens  # tokens of the last image of a sentence
        self.sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])

    @torch.no_grad()
    def add(self, tasks: list[str], logits: Tensor, labels: Tensor) -> None:
        """logits [B, T, V] predicting labels [B, T] (the sentence shifted by one)."""
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        nll = nll.view(labels.shape)
        hits = (logits.argmax(-1) == labels).float()
        for row, task in enumerate(tasks):
            for scope, cut in (("sentence", 0), ("target", labels.shape[1] - self.target_tokens)):
                entry = self.sums[(task, scope)]
                entry[0] += nll[row, cut:].sum().item()
                entry[1] += hits[row, cut:].sum().item()
                entry[2] += labels.shape[1] - cut

    def state(self) -> Tensor:
        """The sums as one tensor (to all-reduce across ranks), in `keys()` order."""
        return torch.tensor([self.sums[key] for key in self.keys()], dtype=torch.float64)

    def keys(self) -> list[tuple[str, str]]:
        return sorted(self.sums)

    def result(self, sums: Tensor | None = None) -> dict[str, dict[str, dict[str, float]]]:
        """{task: {scope: {loss, accuracy (%), perplexity}}}; `sums` overrides (all-reduced)."""
        sums = self.state() if sums is None else sums
        out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
        for (task, scope), (nll, hits, count) in zip(self.keys(), sums.tolist(), strict=True):
            loss = nll / count
            out[task][scope] = {
                "loss": loss,
                "accuracy": 100.0 * hits / count,
                "perplexity": math.exp(min(loss, 700.0)),
            }
        return dict(out)
