"""`delvm demo CONFIG`: the whole pipeline on the toy world, one command, an HTML report at the end.

Stages, each in its own folder under OUT; a finished stage is reused and a killed one resumes:

1. ``world``: the toy world written as paired folders (`delvm data toyworld`);
2. ``tokenizer``: a VQGAN trained on every image of the world (`delvm tokenizer train`);
3. ``store``: the world tokenized into a balanced token store (`delvm data build`);
4. ``lvm``: a small visual language model trained on it (`delvm train`);
5. ``scores``: validation loss / accuracy per task, task scores next to trivial baselines on a
   held-out world, task recognition on mixed scenes, prompt -> output grids;
6. ``report.html``: all of it on one page, with loss curves; ``results.md``: the scores as
   Markdown with the command, date and hardware that measured them (for `delvm results`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from delvm.demo.report import write_report, write_results
from delvm.errors import DelvmError
from delvm.evaluation.scores import FOREGROUND_THRESHOLD
from delvm.fileio import read_json, write_json
from delvm.results import hardware_class

if TYPE_CHECKING:
    from delvm.data.toyworld import ToyWorldConfig

STAGES = ("world", "tokenizer", "store", "lvm", "scores", "report")


@dataclass
class ScoreSection:
    """How the trained model is measured (on a toy world of seed world.seed + seed_offset)."""

    seed_offset: int = 1000
    queries: int = 24  # held-out queries per task
    recognition: int = 24  # mixed scenes, each prompted with every task
    threshold: float = FOREGROUND_THRESHOLD  # segmentation outputs -> masks (scores.py)
    grid_rows: int = 4  # prompt -> output rows per task in the report
    # Queries sharing one draw of support pairs (1: each its own); more run as one batch under
    # one prefilled prompt (task_scores.py): faster, with other draws and so other scores.
    queries_per_prompt: int = 1
    compile: bool = False  # compile the decoding step (`Generator`): pays on a GPU, not a CPU

    def __post_init__(self) -> None:
        if self.queries_per_prompt < 1:
            raise DelvmError(
                f"scores.queries_per_prompt = {self.queries_per_prompt}: use 1 or more"
            )


@dataclass
class DemoConfig:
    """A demo run: one section per stage (see configs/demo.toml)."""

    out: str = "demo_out"
    world: dict = field(default_factory=dict)  # ToyWorldConfig fields
    tokenizer: dict = field(default_factory=dict)  # TokenizerTrainConfig fields (not data/out)
    store: dict = field(default_factory=dict)  # BuildConfig fields (not out/tokenizer/sources)
    train: dict = field(default_factory=dict)  # a `delvm train` config (not out/tokenizer/store)
    scores: ScoreSection = field(default_factory=ScoreSection)


def load_demo_config(path: str | Path, overrides: list[str] = ()) -> DemoConfig:
    from delvm.data.store import BuildConfig
    from delvm.data.toyworld import ToyWorldConfig
    from delvm.tokenizer.train import TokenizerTrainConfig
    from delvm.train.config import load_config, typed_settings

    config = load_config(path, list(overrides), schema=DemoConfig)

    for section, schema, reserved in (
        ("world", ToyWorldConfig, set()),
        ("tokenizer", TokenizerTrainConfig, {"data", "out"}),
        ("store", BuildConfig, {"out", "tokenizer", "sources"}),
        ("train", None, {"out", "tokenizer"}),
    ):
        given = set(getattr(config, section))
        taken = sorted(reserved & given)
        if taken:
            raise DelvmError(f"{path}: [{section}] {taken} are set by the demo itself; remove them")
        known = {f.name for f in fields(schema)} if schema else given
        if given - known:
            raise DelvmError(
                f"{path}: [{section}] unknown setting(s) {sorted(given - known)}; known: "
                f"{sorted(known - reserved)}"
            )
        if schema:  # each value of the right type for its stage's config
            typed_settings(schema, getattr(config, section), str(path), f"{section}.")
    Demo(config).train_config()  # the training section's own checks, before any stage runs
    return config


def context_shots(prompter) -> int:
    """As many example pairs as a prompter's model holds next to the query."""
    per_example = 2 * prompter.image_tokens
    return max(1, prompter.model.config.max_seq_len // per_example - 1)


class Demo:
    """Runs the stages in order; ``self.timings`` records what each took (or that it was reused)."""

    def __init__(self, config: DemoConfig, command: str = "delvm demo"):
        self.config, self.command = config, command
        self.out = Path(config.out)
        self.timings: dict[str, str] = {}
        # Each stage's measured time, kept across reruns (a reused stage keeps its first run's).
        self.stage_log = self.out / "timings.json"
        self.measured: dict[str, dict] = (
            read_json(self.stage_log) if self.stage_log.exists() else {}
        )
        self.paths = {name: self.out / name for name in ("world", "tokenizer", "store", "lvm")}

    # -- bookkeeping

    def check_settings(self) -> None:
        """A demo folder belongs to one config: reusing stages of another would mix results."""
        settings = json.loads(json.dumps(asdict(self.config)))
        saved = self.out / "demo_config.json"
        if saved.exists() and read_json(saved) != settings:
            raise DelvmError(
                f"{self.out} holds a demo run with other settings ({saved}); pass another "
                "out=DIR or remove the folder"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(saved, settings)

    def _stage(self, name: str, done: Callable[[], bool], work: Callable[[], object]) -> None:
        if done():
            self.timings[name] = "reused"
            print(f"[demo] {name}: reused")
            return
        print(f"[demo] {name} ...")
        start = time.perf_counter()
        work()
        if not done():  # a trainer stopped by a signal returns after saving its checkpoint
            raise DelvmError(
                f"demo stage {name} stopped before it finished; run the same command again to "
                "resume it"
            )
        seconds = time.perf_counter() - start
        self.timings[name] = f"{seconds:.0f} s"
        self.measured[name] = {
            "seconds": seconds,
            "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
            "hardware": hardware_class(),
        }
        write_json(self.stage_log, self.measured)
        print(f"[demo] {name}: {self.timings[name]}")

    # -- stages

    def world(self) -> None:
        from delvm.data.toyworld import ToyWorldConfig, write_toyworld

        folder = self.paths["world"]

        def work() -> None:
            # toyworld.json is written last: without it the folder is a killed write, and the
            # world is cheap to regenerate.
            if folder.exists():
                shutil.rmtree(folder)
            write_toyworld(ToyWorldConfig(**self.config.world), folder)

        self._stage("world", (folder / "toyworld.json").exists, work)

    def tokenizer(self) -> None:
        from delvm.tokenizer.train import TokenizerTrainer, recipe

        settings = dict(self.config.tokenizer)
        preset = settings.pop("preset", "cpu-64-f8-1024")
        config = recipe(
            preset, **settings, data=str(self.paths["world"]), out=str(self.paths["tokenizer"])
        )
        done = (self.paths["tokenizer"] / "report.json").exists
        self._stage("tokenizer", done, lambda: TokenizerTrainer(config).run())

    def store(self) -> None:
        from delvm.data.store import BuildConfig, build_store

        summary = read_json(self.paths["world"] / "toyworld.json")
        sources = [task["source"] for task in summary["tasks"].values() if task["count"]]
        config = BuildConfig(
            out=str(self.paths["store"]),
            tokenizer=str(self.tokenizer_folder),
            sources=sources,
            **self.config.store,
        )
        done = (self.paths["store"] / "manifest.json").exists
        self._stage("store", done, lambda: build_store(config))

    @property
    def tokenizer_folder(self) -> Path:
        return self.paths["tokenizer"] / "tokenizer"

    def train_config(self):
        from delvm.train.config import TrainConfig, build_config

        values = json.loads(json.dumps(self.config.train))
        values.update(out=str(self.paths["lvm"]), tokenizer=str(self.tokenizer_folder))
        values.setdefault("data", {})["store"] = str(self.paths["store"])
        return build_config(TrainConfig, values, "demo [train]")

    def lvm(self) -> None:
        from delvm.train.cli import open_sentences
        from delvm.train.state import checkpoint_dirs
        from delvm.train.trainer import Trainer

        config = self.train_config()

        def done() -> bool:
            return any(p.name == f"step-{config.steps:06d}" for p in checkpoint_dirs(config.out))

        self._stage("lvm", done, lambda: Trainer(config, open_sentences(config)).run())

    @property
    def checkpoint(self) -> Path:
        return self.paths["lvm"] / "checkpoints" / f"step-{self.train_config().steps:06d}"

    def scores(self) -> None:
        result_file = self.out / "scores.json"
        self._stage("scores", result_file.exists, lambda: write_json(result_file, self.measure()))

    def held_out_world(self) -> ToyWorldConfig:
        """The toy world the scores are measured on: the demo's, with another seed and no
        mixed scenes."""
        from delvm.data.toyworld import ToyWorldConfig

        world = ToyWorldConfig(**self.config.world)
        return replace(world, seed=world.seed + self.config.scores.seed_offset, mixed=0.0)

    def task_examples(self) -> dict[str, list]:
        """``scores.queries`` held-out examples of each task."""
        from delvm.data.toyworld import TASKS, toyworld_example

        held_out, queries = self.held_out_world(), self.config.scores.queries
        return {
            task: [toyworld_example(held_out, task, i) for i in range(queries)] for task in TASKS
        }

    def score_tasks(self, predict: Callable, examples: dict[str, list], shots: int) -> dict:
        """Segmentation, pose and deraining scores of ``predict(pairs, queries) -> outputs``."""
        from delvm.evaluation.task_scores import derain_scores, foreground_miou, pose_scores

        s = self.config.scores
        seg, pose, derain = (examples[t] for t in ("segmentation", "pose", "derain"))
        group = s.queries_per_prompt
        return {
            "segmentation": foreground_miou(
                predict, seg, shots, s.threshold, queries_per_prompt=group
            ),
            "pose": pose_scores(predict, pose, shots, queries_per_prompt=group),
            "derain": derain_scores(predict, derain, shots, queries_per_prompt=group),
        }

    def measure(self) -> dict:
        """Validation metrics, task scores vs baselines, task recognition, sample grids."""
        from delvm.data.toyworld import TASKS, recognition_set
        from delvm.evaluation.evaluate import evaluate
        from delvm.evaluation.task_scores import prompt_dependence, task_recognition
        from delvm.inference.prompting import load_prompter, save_grid
        from delvm.train.cli import open_sentences

        s = self.config.scores
        prompter = load_prompter(self.checkpoint, self.tokenizer_folder, compile=s.compile)
        validation = evaluate(prompter.model, open_sentences(self.train_config()))
        held_out = self.held_out_world()
        shots = context_shots(prompter)
        group = s.queries_per_prompt

        # Every generated image: the task queries, each recognition scene under every task's
        # prompt, and the report's grids.
        total = len(TASKS) * (s.queries + s.recognition + 2 * s.grid_rows)
        bar = tqdm(total=total, desc="scores", unit="image")

        def predict(pairs, queries):
            bar.update(len(queries))
            return prompter(pairs, queries)

        examples = self.task_examples()

        # The tokenizer's ceiling: each query answered with its own truth through the tokenizer,
        # the scores an LVM predicting every code right would reach.
        truths = {e.images[0].tobytes(): e.images[1] for pool in examples.values() for e in pool}

        def perfect_tokens(pairs, queries):
            return prompter.reconstruct([truths[q.tobytes()] for q in queries])

        mixed_scenes = recognition_set(held_out, s.recognition)
        result = {
            "validation": validation,
            "shots": shots,
            **self.score_tasks(predict, examples, shots),
            "ceiling": self.score_tasks(perfect_tokens, examples, shots),
            "recognition": task_recognition(
                predict, mixed_scenes, s.recognition, shots, queries_per_prompt=group
            ),
            "prompt_dependence": prompt_dependence(
                prompter.answer_nll, mixed_scenes, s.recognition, shots, queries_per_prompt=group
            ),
        }
        grids = self.out / "grids"
        grids.mkdir(exist_ok=True)
        for task in TASKS:
            pool = examples[task]
            rows = []
            for q in range(min(s.grid_rows, len(pool))):
                pairs = [pool[(q + 1 + k) % len(pool)].images for k in range(shots)]
                output = predict([tuple(p) for p in pairs], [pool[q].images[0]])[0]
                rows.append(
                    [*[i for p in pairs for i in p], pool[q].images[0], output, pool[q].images[1]]
                )
            save_grid(rows, grids / f"{task}.png")
        scenes = recognition_set(held_out, s.grid_rows + shots)
        rows = []
        for q in range(s.grid_rows):
            row = [scenes[TASKS[0]][q].images[0]]
            for task in TASKS:
                pairs = [tuple(scenes[task][s.grid_rows + k].images) for k in range(shots)]
                row.append(predict(pairs, [row[0]])[0])
            rows.append(row)
        save_grid(rows, grids / "recognition.png")
        bar.close()
        return result

    def report(self) -> None:
        start = time.perf_counter()
        write_report(self.out, self.config.world, self.timings)
        write_results(self.out, self.command, self.measured)
        self.timings["report"] = f"{time.perf_counter() - start:.0f} s"
        print(f"[demo] report: {self.out / 'report.html'}, {self.out / 'results.md'}")

    def run(self) -> Path:
        self.check_settings()
        for name in STAGES:
            getattr(self, name)()
        return self.out / "report.html"


def _run(args: argparse.Namespace) -> None:
    command = shlex.join(["delvm", "demo", args.config, *args.overrides])
    report = Demo(load_demo_config(args.config, args.overrides), command).run()
    print(f"open {report} in a browser")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the toy world, with an HTML report (reruns reuse stages)",
    )
    p.add_argument("config", nargs="?", default="demo", help="a config file or shipped name")
    p.add_argument(
        "overrides", nargs="*", help="key=value or section.key=value, e.g. out=DIR train.steps=200"
    )
    p.set_defaults(func=_run)
