"""Run a tiny training job on PatternSentences: `python train_run.py OUT [overrides...]`.

Used by the trainer tests as a subprocess, under plain python or torchrun.
"""

import sys

from delvm.train.config import load_config
from delvm.train.trainer import Trainer
from tests.support.sentences import PatternSentences

if __name__ == "__main__":
    out, *overrides = sys.argv[1:]
    base = [
        f"out={out!r}", "steps=6", "micro_batch=2", "grad_accum=2", "checkpoint_every=2",
        "eval_every=3", "log_every=1", "tensorboard=false", "data.seq_len=65",
        "model.preset='tiny'", "model.overrides={'vocab_size': 64, 'codebook_dim': 16}",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_ratio=0.2",
    ]  # fmt: skip
    config = load_config(None, base + overrides)
    Trainer(config, PatternSentences(seq_len=config.data.seq_len)).run()
