"""`delvm experiment reproduce` (`make reproduce`): the four studies on the toy world, every seed,
one results page.

Stages, each resumable after a kill (a rerun reuses what is finished):

1. ``world``: a toy world the tokenizer trains on (`delvm data toyworld`);
2. ``tokenizer``: a small VQGAN trained on it (`delvm tokenizer train`);
3. one folder per study (`delvm experiment STUDY`, the options in the config's section);
4. ``results.md`` and ``results.json``: every study's tables, figures and verdicts, with the
   command, the date, the hardware and the wall time of each stage.

The settings live in a shipped config (`reproduce`, see `delvm configs reproduce`); docs/studies.md
says why each was chosen.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from delvm.configs import find_config
from delvm.errors import DelvmError
from delvm.results import hardware_class

STUDIES = ("balance", "data-scaling", "kd", "continual")


def _argv(name: str, options: dict) -> list[str]:
    """A study's options as its command line: {"steps": 600, "set": ["a=1"]} -> --steps 600 ..."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key == "set":
            for item in value:
                argv += ["--set", item]
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _run_parallel(commands: dict, out: Path, jobs: int, timings: dict) -> None:
    """Run `delvm COMMAND` for each study, `jobs` at a time; each logs to OUT/NAME.log."""
    waiting, running = list(commands), {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while waiting or running:
        while waiting and len(running) < jobs:
            name = waiting.pop(0)
            log = (out / f"{name}.log").open("a")
            process = subprocess.Popen([sys.executable, "-m", "delvm.cli", *commands[name]],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
            running[name] = (process, log, time.perf_counter())
            print(f"[reproduce] {name}: started (log {out / f'{name}.log'})")
        time.sleep(2)
        for name, (process, log, start) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            if process.returncode != 0:
                for other, _, _ in running.values():
                    other.terminate()
                raise DelvmError(f"study {name} failed (exit {process.returncode}); see "
                                 f"{out / f'{name}.log'}; rerun to resume")  # fmt: skip
            timings[name] = time.perf_counter() - start
            print(f"[reproduce] {name}: {timings[name]:.0f} s")


def reproduce(config_name: str, out: Path) -> Path:
    from delvm.cli import build_parser
    from delvm.data.toyworld import ToyWorldConfig, write_toyworld
    from delvm.tokenizer.train import TokenizerTrainer, recipe

    path = find_config(config_name)
    config = tomllib.loads(path.read_text())
    known = {"seeds", "jobs", "run_order", "world", "tokenizer", "common", *STUDIES}
    unknown = sorted(set(config) - known)
    if unknown:
        raise DelvmError(f"{path}: unknown section(s) {unknown}")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.time()

    def stage(name: str, work):
        start = time.perf_counter()
        result = work()
        timings[name] = time.perf_counter() - start
        print(f"[reproduce] {name}: {timings[name]:.0f} s")
        return result

    world = out / "world"

    def make_world() -> None:
        if (world / "toyworld.json").is_file():
            return
        shutil.rmtree(world, ignore_errors=True)  # a killed write; cheap to regenerate
        write_toyworld(ToyWorldConfig(**config.get("world", {})), world)

    stage("world", make_world)
    settings = dict(config.get("tokenizer", {}))
    preset = settings.pop("preset", "cpu-64-f8-1024")
    tok_run = out / "tokenizer"
    tok_config = recipe(preset, **settings, data=str(world), out=str(tok_run))
    stage("tokenizer", lambda: (tok_run / "report.json").is_file()
          or TokenizerTrainer(tok_config).run())  # fmt: skip

    # Each study is its own `delvm experiment` process, `jobs` at a time with one torch thread
    # each (two-thread kernels stall when cores are shared); then, everything cached, each study
    # runs again in this process to give its section of the page.
    commands = {}
    for name in STUDIES:
        options = {"seeds": config["seeds"], **config.get("common", {}), **config.get(name, {})}
        options["set"] = [*config.get("common", {}).get("set", []),
                          *config.get(name, {}).get("set", [])]  # fmt: skip
        commands[name] = ["experiment", name, "--tokenizer", str(tok_run / "tokenizer"),
                          "--out", str(out / name), *_argv(name, options)]  # fmt: skip
    order = config.get("run_order", list(STUDIES))
    if sorted(order) != sorted(STUDIES):
        raise DelvmError(f"{path}: run_order {order} must name each of {list(STUDIES)} once")
    _run_parallel({n: commands[n] for n in order}, out, int(config.get("jobs", 1)), timings)
    parser = build_parser()
    sections, summary = [], {}
    for name, argv in commands.items():
        args = parser.parse_args(argv)
        study = args.func(args)
        summary[name] = json.loads((out / name / "results.json").read_text())
        sections.append(f"## {study.title}\n\n`delvm {' '.join(argv)}`\n\n"
                        + study.markdown(study.notes, f"{name}/", study.extra))  # fmt: skip

    wall = time.time() - started
    rows = "\n".join(f"| {k} | {v:.0f} |" for k, v in timings.items())
    verdicts = "\n".join(
        f"| {name} | {c['claim']} | {c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] | "
        f"**{c['verdict']}** |"
        for name, result in summary.items() for c in result["claims"]
    )  # fmt: skip
    header = [
        "# The paper's findings on the toy world: `make reproduce`", "",
        "Written by `make reproduce` (`delvm experiment reproduce`, settings: the shipped config "
        f"`{path.stem}`) on {datetime.date.today().isoformat()}, on {hardware_class()}. Seeds "
        f"{', '.join(map(str, config['seeds']))} unless a study's command says more; the studies ran {config.get('jobs', 1)} at a "
        "time, one torch thread each; this run's wall time "
        f"{wall / 60:.0f} min (stages resumed from an earlier run count only their remaining "
        "work).", "",
        "## Verdicts", "",
        "| study | claim | mean difference [95 % interval] | verdict |", "|---|---|---|---|",
        verdicts, "",
        "## Wall time per stage (this run)", "", "| stage | seconds |", "|---|---|", rows, "",
    ]  # fmt: skip
    page = out / "results.md"
    page.write_text("\n".join(header) + "\n" + "\n".join(sections))
    (out / "results.json").write_text(json.dumps(
        {"config": str(path), "date": datetime.date.today().isoformat(), "hardware": hardware_class(),
         "timings_s": timings, "studies": summary}, indent=2) + "\n")  # fmt: skip
    print(f"results: {page}")
    return page


def _run(args: argparse.Namespace) -> None:
    reproduce(args.config, args.out)


def add_command(studies: argparse._SubParsersAction) -> None:
    p = studies.add_parser("reproduce", help="all four studies on the toy world: results.md")
    p.add_argument("--config", default="reproduce", help="a shipped name or a TOML file")
    p.add_argument("--out", type=Path, default=Path("reproduce_out"))
    p.set_defaults(func=_run)
