"""Shared by the benchmarks: best of a few calls after a warm-up, synchronised on CUDA; a printed
table kept as a section of the results page (`results_file`)."""

from __future__ import annotations

import contextlib
import datetime
import io
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def best_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


class _Tee(io.StringIO):
    """Text written here goes to the real stdout as well (the table prints as it is measured)."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.stream.flush()
        return super().write(text)


@contextlib.contextmanager
def results_file(folder: str | None, title: str):
    """Everything printed inside, also written to ``folder/results.md`` (when ``folder`` is given)
    under ``title``, the command that printed it, the date and the hardware: a section for the
    results page (`delvm results`)."""
    if folder is None:
        yield
        return
    from delvm.results import RUN_RESULTS, hardware_class

    command = " ".join(["python", *map(shlex.quote, sys.argv)])
    with contextlib.redirect_stdout(_Tee(sys.stdout)) as printed:
        yield
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_RESULTS).write_text(
        f"# {title}\n\nWritten by `{command}` on {datetime.date.today().isoformat()}, on "
        f"{hardware_class()}.\n\n```text\n{printed.getvalue().rstrip()}\n```\n"
    )
