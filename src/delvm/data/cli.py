"""`delvm data toyworld | build | inspect`: the toy world here, the token store's verbs in
`delvm.data.store_cli`."""

from __future__ import annotations

import argparse
from dataclasses import fields

from delvm.data.store_cli import add_store_commands
from delvm.data.toyworld import SEGMENTATION_TARGETS, TASKS, ToyWorldConfig, write_toyworld


def _toyworld(args: argparse.Namespace) -> None:
    given = {f.name: getattr(args, f.name) for f in fields(ToyWorldConfig)}
    config = ToyWorldConfig(**{k: v for k, v in given.items() if v is not None})
    summary = write_toyworld(config, args.out)
    counts = ", ".join(f"{task} {info['count']}" for task, info in summary["tasks"].items())
    print(f"toy world at {config.resolution} px in {args.out}: {counts}")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="data sources, toy world, token store")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    defaults = ToyWorldConfig()
    toy = data_sub.add_parser(
        "toyworld",
        help="write the procedural toy world (segmentation, pose, derain) as paired folders",
        description="Write OUT/<task>/input and OUT/<task>/target PNGs, OUT/pose/keypoints.json "
        "and OUT/toyworld.json (config, counts, and the paired-source settings to read it back).",
    )
    toy.add_argument("out", help="output folder (must be new or empty)")
    toy.add_argument("--seed", type=int, help=f"world seed (default {defaults.seed})")
    toy.add_argument(
        "--resolution", type=int, help=f"image side in pixels (default {defaults.resolution})"
    )
    for task in TASKS:
        toy.add_argument(
            f"--{task}",
            type=int,
            metavar="N",
            help=f"{task} examples (default {getattr(defaults, task)})",
        )
    toy.add_argument(
        "--mixed",
        type=float,
        metavar="SHARE",
        help="share of each task's examples drawn as a mixed scene (shapes, a figure and rain in "
        f"one input), which makes the prompt the only cue to the task (default {defaults.mixed})",
    )
    toy.add_argument(
        "--rain",
        type=float,
        metavar="DENSITY",
        help=f"rain streaks relative to the default 15-30 per image (default {defaults.rain})",
    )
    toy.add_argument(
        "--segmentation-target",
        choices=SEGMENTATION_TARGETS,
        help="segmentation answers: each instance in a random colour, or every instance white "
        f"(default {defaults.segmentation_target})",
    )
    toy.add_argument(
        "--no-textures",
        dest="textures",
        action="store_const",
        const=False,
        help="flat colours and gentle gradients only: no patterned fills or sample photos (what a "
        "CPU-sized tokenizer reconstructs; the demo's world)",
    )
    toy.set_defaults(func=_toyworld)

    # `delvm data build` and `delvm data inspect` (token store) register here.
    add_store_commands(data_sub)
