"""The configs shipped with delvm, reachable by name from any folder.

A verb that takes a config accepts a file path, or the name of a shipped config: ``tiny``,
``paper_300m``, ``data/toyworld`` (``.toml`` and a leading ``configs/`` may be given). A file that
exists is always preferred, so a user's own copy (``delvm configs copy NAME``) wins.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from delvm.errors import DelvmError

CONFIG_DIR = Path(__file__).resolve().parent


def shipped_configs() -> list[str]:
    """Names of the shipped configs, e.g. ``['classify_toy', ..., 'data/toyworld', 'tiny']``."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix()
                  for p in CONFIG_DIR.rglob("*.toml"))  # fmt: skip


def find_config(path: str | Path) -> Path:
    """A config file: ``path`` itself if it exists, else the shipped config of that name."""
    path = Path(path)
    if path.exists():
        return path
    name = path.as_posix().removeprefix("configs/").removesuffix(".toml")
    shipped = CONFIG_DIR / f"{name}.toml"
    if shipped.is_file():
        return shipped
    raise DelvmError(
        f"{path}: no such config file, and no shipped config of that name; "
        f"`delvm configs` lists them ({', '.join(shipped_configs())})"
    )


def _list(args: argparse.Namespace) -> None:
    if args.name is None:
        for name in shipped_configs():
            print(name)
        return
    source = find_config(args.name)
    if args.copy_to is None:
        print(source.read_text(), end="")
        return
    target = Path(args.copy_to)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise DelvmError(f"{target}: already exists; remove it or copy to another path")
    shutil.copyfile(source, target)
    print(f"copied {source.name} to {target}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "configs",
        help="list the shipped configs, print one, or copy one to edit",
        description="With no argument: list the shipped configs. With NAME: print it. With NAME "
        "and --copy-to: copy it to a file or folder, to edit and pass to any verb by path.",
    )
    p.add_argument("name", nargs="?", help="a shipped config, e.g. tiny or data/toyworld")
    p.add_argument("--copy-to", metavar="PATH", help="copy the config here instead of printing it")
    p.set_defaults(func=_list)
