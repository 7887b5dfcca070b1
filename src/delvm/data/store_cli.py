"""`delvm data build CONFIG` and `delvm data inspect STORE`: the token store's verbs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from delvm.devices import add_device_argument, resolve_device
from delvm.errors import DelvmError


def _build(args: argparse.Namespace) -> None:
    from delvm.data.store import build_store, format_report, load_build_config

    config = load_build_config(
        args.config, out=args.out, tokenizer=args.tokenizer, workers=args.workers
    )
    report = build_store(config, resolve_device(args.device))
    if int(os.environ.get("RANK", 0)) == 0:
        seconds = report["seconds"]
        print(format_report(report))
        print(
            f"store {config.out}: {seconds['total']:.1f} s, of which {seconds['encode']:.1f} s "
            "in the tokenizer"
        )


def _inspect(args: argparse.Namespace) -> None:
    from delvm.data.sampler import SamplerConfig, SentenceSampler
    from delvm.data.store import format_report, open_store
    from delvm.fileio import read_json

    store = open_store(args.store, verify=not args.no_verify)
    tokenizer = store.manifest["tokenizer"]
    print(f"store {store.path}: tokenizer {tokenizer['fingerprint']} ({tokenizer['path']}), "
          f"{store.num_codes} codes, {store.grid_size}x{store.grid_size} tokens per image, "
          f"balance {store.balance}")  # fmt: skip
    print(format_report(read_json(store.path / "report.json")))
    folder = args.tokenizer or Path(tokenizer["path"])
    if not (Path(folder) / "config.json").is_file():
        print(f"no tokenizer at {folder}: pass --tokenizer DIR to decode a sample sentence")
        return
    from delvm.inference.prompting import save_grid
    from delvm.tokenizer import load_tokenizer

    model = load_tokenizer(folder, resolve_device(args.device))
    if model.fingerprint() != store.fingerprint:
        raise DelvmError(
            f"{folder}: tokenizer {model.fingerprint()} is not the one the store was built with "
            f"({store.fingerprint}); pass the matching --tokenizer"
        )
    config = SamplerConfig(seq_len=args.seq_len, balance="none", val_fraction=0.0, seed=args.seed)
    sampler = SentenceSampler(store, config)
    rows = []
    for task in sampler.tasks:
        ids = sampler.train_batch(0, 0, range(1), [task]).ids
        pixels = model.decode(ids.view(-1, store.tokens_per_image))
        images = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        rows.append(list(images))
        print(f"{task}: one sentence of {ids.shape[1]} tokens = {len(images)} images")
    print(save_grid(rows, args.grid or Path(f"{store.path.name}-sample.png")))


def add_store_commands(data_subparsers: argparse._SubParsersAction) -> None:
    """Register `build` and `inspect` under `delvm data`."""
    p = data_subparsers.add_parser(
        "build",
        help="sources -> balanced, tokenized token store (resumable; torchrun for many ranks)",
        description="Build the token store a TOML config describes (see `delvm configs`, "
        "data/*). Under torchrun (--nnodes, --nproc_per_node) each rank reads, decodes and "
        "encodes its own share of the files, on its own GPU (cuda:LOCAL_RANK); --workers "
        "processes per rank do the reading, mask and skeleton rendering, resizing and "
        "augmentation while the rank encodes. The store is byte-identical for any number of "
        "ranks and workers. A killed build resumes where it stopped when run again with the "
        "same config, with any number of ranks and workers. Unreadable files are skipped and "
        "listed with the reason in the report.",
    )
    p.add_argument("config", type=Path, help="build config (TOML)")
    p.add_argument("--out", help="store folder (overrides the config's `out`)")
    p.add_argument("--tokenizer", help="tokenizer folder (overrides the config's `tokenizer`)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="decoding processes per rank (overrides the config's `workers`; default 0: decode "
        "in the rank's own process); about one per CPU core a rank has to itself",
    )
    add_device_argument(p)
    p.set_defaults(func=_build)

    p = data_subparsers.add_parser(
        "inspect",
        help="counts per task, tokenizer, build report; a sample sentence per task as a PNG grid",
    )
    p.add_argument("store", type=Path, help="token store folder")
    p.add_argument(
        "--tokenizer", type=Path, help="tokenizer folder (default: the one the store records)"
    )
    p.add_argument("--grid", type=Path, help="PNG to write (default: ./STORE-sample.png)")
    p.add_argument("--seq-len", type=int, default=2048, help="sentence length to sample")
    p.add_argument("--seed", type=int, default=0)
    add_device_argument(p)
    p.add_argument("--no-verify", action="store_true", help="check sizes only, not checksums")
    p.set_defaults(func=_inspect)
