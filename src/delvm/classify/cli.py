"""`delvm classify train | eval | toyset`: fine-tune the trunk as a classifier and measure it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from delvm.devices import add_dtype_argument, inference_dtype
from delvm.errors import DelvmError
from delvm.fileio import write_json


def _train(args: argparse.Namespace) -> None:
    from delvm.classify.train import ClassifierTrainer, ClassifyConfig
    from delvm.train.config import load_config

    config = load_config(args.config, args.overrides, schema=ClassifyConfig)
    try:
        ClassifierTrainer(config).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _eval(args: argparse.Namespace) -> None:
    from delvm.classify.data import ImageFolder
    from delvm.classify.evaluate import evaluate
    from delvm.classify.model import load_classifier
    from delvm.classify.toyset import ToySection, ToyWorldKinds
    from delvm.classify.train import format_result
    from delvm.train.distributed import init_world
    from delvm.train.state import resolve_checkpoint

    world = init_world()
    folder = resolve_checkpoint(args.checkpoint)
    model, meta = load_classifier(folder, world.device)
    data = meta["data"]
    if args.data is not None:
        images = ImageFolder(args.data)
        if images.classes != meta["classes"]:
            raise DelvmError(
                f"{args.data}: class folders {images.classes[:5]}... differ from the "
                f"checkpoint's classes {meta['classes'][:5]}...; evaluate on the same classes"
            )
    elif data["val"]:
        images = ImageFolder(data["val"])
    elif not data["train"]:
        images = ToyWorldKinds(ToySection(**data["toy"]), "val")
    else:
        raise DelvmError(f"{folder}: trained without a validation folder; pass --data FOLDER")
    crop = args.crop if args.crop is not None else data["eval_crop"]
    dtype = inference_dtype(args.dtype, world.device)
    autocast = torch.autocast(world.device.type, dtype, enabled=dtype != torch.float32)
    try:
        result = evaluate(model, images, crop, args.batch_size, args.workers, world, autocast)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if world.is_main:
        print(f"{folder}: {format_result(result)}")
        if args.json is not None:
            write_json(args.json, {"checkpoint": str(folder), **result})


def _toyset(args: argparse.Namespace) -> None:
    from delvm.classify.toyset import ToySection, write_toy_folders

    toy = ToySection(seed=args.seed, resolution=args.resolution, train=args.train, val=args.val)
    out = write_toy_folders(toy, args.out)
    print(json.dumps({"train": str(out / "train"), "val": str(out / "val")}))


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("classify", help="image classification with the trunk (Section 6)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="fine-tune a classifier (resumes from OUT if present)")
    p.add_argument("config", help="a TOML config file or shipped name (delvm configs)")
    p.add_argument("overrides", nargs="*", help="section.key=value settings, e.g. steps=100")
    p.set_defaults(func=_train)

    p = verbs.add_parser("eval", help="top-1 / top-5 of a classifier on a labelled image set")
    p.add_argument("checkpoint", type=Path, help="a classifier checkpoint or a run's out folder")
    p.add_argument("--data", type=Path, help="image folder (one sub-folder per class); "
                   "default: the validation set the checkpoint was trained with")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image-loading processes")
    p.add_argument("--crop", type=float, help="centre-crop share (default: the training config's)")
    add_dtype_argument(p)  # autocast; the weights stay fp32
    p.add_argument("--json", type=Path, help="also write the result here")
    p.set_defaults(func=_eval)

    p = verbs.add_parser(
        "toyset", help="write the toy set (kinds of toy-world image) as image folders"
    )
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=6000, help="training images (balanced)")
    p.add_argument("--val", type=int, default=600, help="validation images (balanced)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_toyset)
