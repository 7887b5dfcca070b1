"""`delvm train CONFIG [section.key=value ...]`: run (or resume) a training job."""

from __future__ import annotations

import argparse

import torch.distributed as dist

from delvm.errors import DelvmError
from delvm.train.config import TrainConfig, load_config


def open_sentences(config: TrainConfig):
    """The store-backed sentence source for a run, checked against the run's tokenizer."""
    from delvm.data.sampler import SentenceSampler, open_val_stores
    from delvm.data.store import open_store

    if not config.data.store:
        raise DelvmError("config data.store is empty: set it to a store from `delvm data build`")
    codebook, fingerprint = None, None
    if config.tokenizer:
        from delvm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer)
        codebook, fingerprint = tokenizer.codebook.detach().clone(), tokenizer.fingerprint()
    store = open_store(config.data.store, fingerprint=fingerprint)
    val_stores = open_val_stores(config.data.val_stores, fingerprint)
    return SentenceSampler(store, config.data.sampler_config(), codebook, val_stores)


def _train(args: argparse.Namespace) -> None:
    from delvm.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    try:
        Trainer(config, open_sentences(config)).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train, distil, fine-tune (resumes from OUT if present)")
    p.add_argument("config", help="a TOML config file or shipped name (delvm configs)")
    p.add_argument("overrides", nargs="*", help="section.key=value settings, e.g. steps=100")
    p.set_defaults(func=_train)
