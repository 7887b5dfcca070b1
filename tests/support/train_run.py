"""A tiny training job on PatternSentences: `python -m tests.support.train_run OUT [overrides...]`.

The trainer tests use `tiny_config` in process and run this module as a subprocess (under plain
python or torchrun) where a run must be killed, signalled or split across ranks.
"""

import sys

from delvm.train.config import TrainConfig, load_config
from delvm.train.trainer import Trainer
from tests.support.sentences import PatternSentences


def tiny_config(out, *overrides: str) -> TrainConfig:
    """6 steps of 2 micro-batches of 2 rows, checkpoints every 2 steps, a 64-code tiny model; fp32
    ("auto" is bf16 on CPUs with native bf16), as the references the tests compare with."""
    base = [
        f"out={str(out)!r}", "steps=6", "micro_batch=2", "grad_accum=2", "checkpoint_every=2",
        "eval_every=3", "log_every=1", "tensorboard=false", "data.seq_len=65",
        "model.preset='tiny'", "model.overrides={'vocab_size': 64, 'codebook_dim': 16}",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_ratio=0.2", "precision='fp32'",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))


if __name__ == "__main__":
    config = tiny_config(*sys.argv[1:])
    Trainer(config, PatternSentences(seq_len=config.data.seq_len)).run()
