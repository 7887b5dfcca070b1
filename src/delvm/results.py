"""`delvm results PAGE RUN [RUN ...]`: the results page, assembled from what runs measured.

Every run folder that measures something writes its own ``results.md`` from its JSON, naming
the command, the date and the hardware class (`delvm demo` from ``scores.json``; the paper's
studies under `make reproduce`). This verb puts those files on one page under a header that
says how to regenerate it, so nothing on the page is typed by hand. Images and files a run's
``results.md`` links to are copied beside the page, so the page still shows them once the run
folder is gone.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
from pathlib import Path

from delvm.errors import DelvmError
from delvm.fileio import atomic_write

RUN_RESULTS = "results.md"
# A Markdown link or image whose target is a relative path: ](target) or ](target "title").
LINK = re.compile(r"(\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")


def hardware_class() -> str:
    """The machine in one line: CPU model, the CPUs this process may use, torch's threads, GPU."""
    import torch

    from delvm.devices import cpuinfo_field  # imports torch, as this function does

    cpu = cpuinfo_field("model name") or platform.processor() or platform.machine()
    # The CPUs this process may run on (a container or taskset can allow fewer than the machine's).
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = f"{len(gpus)} GPU(s): {', '.join(sorted(set(gpus)))}"
    else:
        gpu = "no GPU"
    return (
        f"{cpu}, {usable} CPU(s) usable, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s), {gpu} ({platform.system()} {platform.machine()})"
    )


def _shift_headings(text: str) -> str:
    """Each Markdown heading one level down (outside code fences): runs become sections."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,5} ", line):
            line = "#" + line
        lines.append(line)
    return "\n".join(lines)


def _carry_links(text: str, run: Path, files: Path, page_dir: Path) -> str:
    """Copy what the run's page links to into ``files`` and point the links there."""

    def carry(match: re.Match) -> str:
        target = match.group(2)
        source = run / target
        if "://" in target or target.startswith(("#", "/")) or not source.is_file():
            return match.group(0)
        copy = files / target
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
        return f"{match.group(1)}{os.path.relpath(copy, page_dir)}{match.group(3)}"

    return LINK.sub(carry, text)


def assemble(page: Path, runs: list[Path], command: str) -> Path:
    """Write ``page`` from each run's results.md, in the order given; return its path."""
    page = Path(page)
    missing = [str(run) for run in runs if not (Path(run) / RUN_RESULTS).is_file()]
    if missing:
        raise DelvmError(
            f"no {RUN_RESULTS} in {', '.join(missing)}: pass folders of finished runs (`delvm "
            "demo` writes OUT/results.md, and rerunning it on a finished folder writes it again)"
        )
    names = [Path(run).resolve().name for run in runs]
    if len(set(names)) < len(names):
        raise DelvmError(f"runs {', '.join(map(str, runs))}: two folders share a name; rename one")
    page.parent.mkdir(parents=True, exist_ok=True)
    files = page.parent / f"{page.stem}_files"
    if files.exists():  # a file no run links to any more must not linger
        shutil.rmtree(files)
    sections = [
        _carry_links(
            _shift_headings((Path(run) / RUN_RESULTS).read_text()),
            Path(run),
            files / name,
            page.parent,
        )  # fmt: skip
        for run, name in zip(runs, names, strict=True)
    ]
    header = (
        "# Measured results\n\n"
        f"This page is generated: `{command}` assembled it from the `{RUN_RESULTS}` each run "
        "wrote from its own JSON. Each section names the command that measured it, when, and on "
        "what hardware. Edit nothing here by hand; rerun the runs and the command instead.\n"
    )
    body = "\n\n".join(section.strip() + "\n" for section in sections)
    atomic_write(page, lambda tmp: tmp.write_text(f"{header}\n{body}"))
    return page


def _run(args: argparse.Namespace) -> None:
    command = shlex.join(["delvm", "results", str(args.page), *map(str, args.runs)])
    print(f"wrote {assemble(args.page, args.runs, command)}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "results",
        help="assemble a results page from the results.md of finished runs",
        description="Write PAGE from RUN/results.md of each run folder given (e.g. demo_out, "
        "reproduce_out), under a header naming this command.",
    )
    p.add_argument("page", type=Path, help="the page to write, e.g. docs/results.md")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders, in page order")
    p.set_defaults(func=_run)
