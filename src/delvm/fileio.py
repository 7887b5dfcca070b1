"""Small file helpers every stage shares: atomic writes and JSON with one-line errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from delvm.errors import DelvmError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename tmp onto ``path``: a killed writer leaves no half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DelvmError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise DelvmError(f"{path}: not valid JSON ({err})") from None
