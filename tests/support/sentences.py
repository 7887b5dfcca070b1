"""A deterministic in-memory SentenceSource for trainer tests (no tokenizer or store needed).

Each task has its own learnable pattern (a per-task random permutation walked with noise), so
losses fall during training; batches are a pure function of (step, micro, row), which is the
contract the real store-backed source follows too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from delvm.data.sampler import SentenceBatch


class PatternSentences:
    def __init__(self, tasks=("segmentation", "pose"), vocab: int = 64, seq_len: int = 65,
                 image_tokens: int = 16, seed: int = 0, noise: float = 0.1):  # fmt: skip
        self.tasks = list(tasks)
        self.vocab_size, self.seq_len, self.image_tokens = vocab, seq_len, image_tokens
        self.seed, self.noise = seed, noise
        self.tokenizer_fingerprint = "test-fingerprint"
        g = torch.Generator().manual_seed(seed)
        self.next_code = {t: torch.randperm(vocab, generator=g) for t in self.tasks}
        self._codebook = torch.randn(vocab, 16, generator=g)

    def codebook(self) -> Tensor:
        return self._codebook

    def _sentence(self, key: int, task: str) -> Tensor:
        g = torch.Generator().manual_seed(key)
        ids = torch.empty(self.seq_len, dtype=torch.long)
        ids[0] = torch.randint(0, self.vocab_size, (1,), generator=g)
        for i in range(1, self.seq_len):
            if torch.rand(1, generator=g).item() < self.noise:
                ids[i] = torch.randint(0, self.vocab_size, (1,), generator=g)
            else:
                ids[i] = self.next_code[task][ids[i - 1]]
        return ids

    def train_batch(self, step: int, micro: int, rows: range, tasks: list[str]):
        names, sentences = [], []
        for row in rows:
            key = (self.seed * 1_000_003 + step) * 10_007 + micro * 101 + row
            task = tasks[key % len(tasks)]
            names.append(task)
            sentences.append(self._sentence(key, task))
        return SentenceBatch(torch.stack(sentences), names)

    def val_batches(self, batch_size: int):
        out = []
        for i, task in enumerate(self.tasks):
            ids = torch.stack([self._sentence(-(i * 100 + j) - 1, task) for j in range(2)])
            out.append(SentenceBatch(ids, [task, task]))
        return out
