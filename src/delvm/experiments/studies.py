"""`delvm experiment {balance,data-scaling,kd,continual}`: the paper's studies, one command each.

Every study trains a few *arms* with the same steps, seeds and training config, evaluates each
arm's final checkpoint on the same held-out sentences, and writes OUT/report.md (the paper-style
table), OUT/results.json, OUT/loss_curves.png and one sample grid per arm (OUT/samples/ARM.png).

- balance (Table 1): unbalanced vs re-sampled vs augmented tail tasks;
- data-scaling (Figure 2): more real pose examples (x1, x2, x4) vs more augmented copies;
- kd (Tables 2/3/6): a larger teacher, a student from scratch, a student distilled from it;
- continual (Tables 5/11): stages segmentation -> pose -> derain, lr "continue" vs "rescale".

By default the data is the built-in toy world (built into OUT/stores), evaluated on a held-out
toy world of another seed; `--store` runs balance, kd and continual on an existing store instead,
evaluated on its held-out split (the one training leaves out).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from delvm.data.sampler import SamplerConfig, SentenceSampler
from delvm.data.store import BuildConfig, build_store, open_store
from delvm.errors import DelvmError
from delvm.evaluation.evaluate import evaluate
from delvm.evaluation.metrics import SCOPES
from delvm.inference.prompting import VisualPrompter, save_grid
from delvm.model.checkpoint import load_model
from delvm.tokenizer import load_tokenizer
from delvm.train.cli import open_sentences
from delvm.train.config import load_config

TOY_TASKS = ("segmentation", "pose", "derain")
EVAL_SEED_OFFSET = 1_000  # the evaluation world: same generator, scenes never trained on


@dataclass(frozen=True)
class Arm:
    """One training run of a study: its store and its training overrides."""

    name: str
    store: Path
    overrides: list[str] = field(default_factory=list)


class Study:
    """Shared machinery: building toy stores, training arms, evaluating and reporting."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        # Rerunning with the same settings resumes (stores and arms are reused); other settings
        # would silently mix with the old arms, so they are refused.
        settings = {k: str(v) for k, v in sorted(vars(args).items()) if k != "func"}
        recorded = self.out / "study.json"
        if recorded.is_file() and json.loads(recorded.read_text()) != settings:
            raise DelvmError(
                f"{self.out}: holds a study run with other settings ({recorded}); "
                "pass a new --out, or delete that folder"
            )
        recorded.write_text(json.dumps(settings, indent=2) + "\n")
        self.tokenizer = load_tokenizer(args.tokenizer)
        self.base = load_config(args.train_config, self._overrides([]))

    # -- data

    def toy_store(
        self, name: str, balance: str, counts: dict, tasks: dict | None = None, world: int = 0
    ) -> Path:
        """Build (or reuse) a toy-world store; one source per task so only tail tasks augment.
        `world` offsets the toy world's seed (the evaluation world)."""
        a = self.args
        sources = [
            {"format": "toyworld", "seed": a.seed + world, "resolution": a.resolution,
             **{t: (counts[t] if t == task else 0) for t in TOY_TASKS}}
            for task in TOY_TASKS if counts[task]
        ]  # fmt: skip
        path = self.out / "stores" / name
        if not (path / "manifest.json").is_file():
            config = BuildConfig(
                out=str(path), tokenizer=str(a.tokenizer), sources=sources, balance=balance,
                tasks=tasks or {}, seed=a.seed, shard_size=max(counts.values()),
            )  # fmt: skip
            build_store(config)
        return path

    def counts(self, pose_factor: int = 1) -> dict:
        a = self.args
        return {"segmentation": a.segmentation, "pose": a.pose * pose_factor, "derain": a.derain}

    def eval_sampler(self, store: Path | None = None) -> SentenceSampler:
        """The held-out sentences every arm is scored on."""
        d = self.base.data
        if store is None:  # toy world: a separate world of another seed, never trained on
            counts = {t: self.args.eval_examples for t in TOY_TASKS}
            store = self.toy_store("eval", "none", counts, world=EVAL_SEED_OFFSET)
            fraction = 0.5  # half of the evaluation world is scored; the rest is unused
        else:
            fraction = d.val_fraction
        config = SamplerConfig(
            seq_len=d.seq_len, balance="none", val_fraction=fraction,
            val_sentences=d.val_sentences, seed=d.seed,
        )  # fmt: skip
        return SentenceSampler(open_store(store, self.tokenizer.fingerprint()), config)

    # -- training

    def _overrides(self, extra: list[str]) -> list[str]:
        a = self.args
        # The study's own settings first, so `--set` can still change any of them.
        fixed = [f"tokenizer={str(a.tokenizer)!r}", f"steps={a.steps}", f"seed={a.seed}",
                 f"data.seed={a.seed}", f"eval_every={a.steps}", f"checkpoint_every={a.steps}"]  # fmt: skip
        return [*fixed, *extra, *a.set]

    def train(self, arm: Arm) -> Path:
        """Train (or resume) an arm; returns its final checkpoint."""
        from delvm.train.trainer import Trainer

        run = self.out / "arms" / arm.name
        overrides = [f"out={str(run)!r}", f"data.store={str(arm.store)!r}", *arm.overrides]
        config = load_config(self.args.train_config, self._overrides(overrides))
        Trainer(config, open_sentences(config)).run()
        return run / "checkpoints" / f"step-{config.steps:06d}"

    def run_arms(self, arms: list[Arm], sampler: SentenceSampler) -> dict:
        """Train every arm, score it on `sampler`'s held-out sentences, draw its samples."""
        results = {}
        for arm in arms:
            model = load_model(self.train(arm)).eval()
            results[arm.name] = evaluate(model, sampler)
            self.sample_grid(arm.name, model, sampler)
        return results

    # -- outputs

    def sample_grid(self, name: str, model, sampler: SentenceSampler) -> Path:
        """One prompt per two-image task: example pair | query | generated | ground truth."""
        prompter = VisualPrompter(model, self.tokenizer)
        pairs = []  # per task: (example [2, hw], query [2, hw]) from the held-out pool
        for task in sampler.tasks:
            tokens, pool = sampler.store.tasks[task], sampler.val[task]
            if tokens.images_per_example == 2 and len(pool.origins) >= 2:
                rows = pool.rows[pool.starts[:2]]
                pairs.append(torch.from_numpy(np.asarray(tokens.tokens[rows], np.int64)))
        path = self.out / "samples" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        if not pairs:
            return path
        pairs = torch.stack(pairs)  # [tasks, 2 examples, 2 images, hw]
        prompts = torch.cat([pairs[:, 0, 0], pairs[:, 0, 1], pairs[:, 1, 0]], dim=1)
        generated = prompter.continue_ids(prompts, prompter.image_tokens, None)  # one batch
        ids = torch.stack([pairs[:, 0, 0], pairs[:, 0, 1], pairs[:, 1, 0], generated,
                           pairs[:, 1, 1]], dim=1)  # fmt: skip
        pixels = self.tokenizer.decode(ids.flatten(0, 1)).clamp(0, 1).permute(0, 2, 3, 1)
        images = (
            (pixels.numpy() * 255 + 0.5).astype(np.uint8).reshape(*ids.shape[:2], *pixels.shape[1:])
        )
        return save_grid([list(row) for row in images], path)

    def loss_curves(self, names: list[str], title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display on servers
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            lines = (self.out / "arms" / name / "log.jsonl").read_text().splitlines()
            records = [r for r in map(json.loads, lines) if "loss" in r]
            ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=name)
        ax.set(xlabel="step", ylabel="training loss", title=title)
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def report(self, title: str, results: dict, notes: str = "", extra: str = "") -> Path:
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        self.loss_curves(list(results), title)
        a = self.args
        text = [
            f"# {title}", "",
            f"Every arm: {a.steps} steps, seed {a.seed}, training config {a.train_config}"
            + (f", overrides {a.set}" if a.set else "") + ".", "",
            notes, "", arms_table(results), "",
            "![training loss](loss_curves.png)", "",
            *[f"- {name}: ![samples](samples/{name}.png)" for name in results],
            "", "Sample rows: example input | example output | query | generated | truth.",
            extra,
        ]  # fmt: skip
        path = self.out / "report.md"
        path.write_text("\n".join(text) + "\n")
        print(arms_table(results))
        print(f"report: {path}")
        return path


def arms_table(results: dict) -> str:
    """Arms x tasks; loss / acc % / ppl over the whole sentence and over the target image."""
    header = ["arm", "task"] + [f"{m} ({s})" for s in SCOPES for m in ("loss", "acc %", "ppl")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, result in results.items():
        for task in sorted(result):
            cells = [arm, task]
            for scope in SCOPES:
                m = result[task][scope]
                cells += [f"{m['loss']:.4f}", f"{m['accuracy']:.2f}", f"{m['perplexity']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the four studies --------------------------------------------------------------------------


def _data(study: Study) -> tuple[Path, SentenceSampler]:
    """The store the arms train on (toy world, augment-built, or --store) and the scoring set."""
    if study.args.store:
        return study.args.store, study.eval_sampler(study.args.store)
    return study.toy_store("augment", "augment", study.counts()), study.eval_sampler()


def run_balance(args: argparse.Namespace) -> None:
    study = Study(args)
    store, sampler = _data(study)
    # One augment-built store serves all three: "none" and "resample" draw its originals only.
    arms = [Arm(name, store, [f"data.balance={mode!r}"]) for name, mode in
            [("unbalanced", "none"), ("resampled", "resample"), ("augmented", "augment")]]  # fmt: skip
    study.report("Balancing long-tailed tasks (paper Table 1)", study.run_arms(arms, sampler),
                 "Unbalanced: natural proportions; re-sampled: tail examples repeated to equal "
                 "weight; augmented: tail examples' augmented copies.")  # fmt: skip


def run_data_scaling(args: argparse.Namespace) -> None:
    study = Study(args)
    arms = []
    for factor in args.real_factors:
        store = study.toy_store(f"real-x{factor}", "none", study.counts(factor))
        arms.append(Arm(f"real-x{factor}", store, ["data.balance='none'"]))
    for copies in args.copies:
        tasks = {"pose": {"copies": copies}, "derain": {"copies": 0}}  # only the studied task
        store = study.toy_store(f"aug-c{copies}", "augment", study.counts(), tasks)
        arms.append(Arm(f"augmented-c{copies}", store, ["data.balance='augment'"]))
    study.report("More real data vs more augmented copies of the tail task (paper Figure 2)",
                 study.run_arms(arms, study.eval_sampler()),
                 f"Tail task: pose, {args.pose} real examples at x1. real-xN: N times the real "
                 "pose examples; augmented-cN: x1 real plus N augmented copies of each.")  # fmt: skip


def run_kd(args: argparse.Namespace) -> None:
    study = Study(args)
    store, sampler = _data(study)
    teacher = Arm("teacher", store, [f"model.overrides.{s}" for s in args.teacher])
    teacher_ckpt = study.train(teacher)
    arms = [teacher, Arm("student", store),
            Arm("student-kd", store, [f"distill.teacher={str(teacher_ckpt)!r}"])]  # fmt: skip
    study.report("Knowledge distillation (paper Tables 2/3/6)", study.run_arms(arms, sampler),
                 f"Teacher: the training config's model with {args.teacher}; students: the "
                 "training config's model, from scratch and distilled from the teacher.")  # fmt: skip


def run_continual(args: argparse.Namespace) -> None:
    if len(args.stages) < 2:
        raise DelvmError(f"--stages {args.stages}: continual learning needs two stages or more")
    study = Study(args)
    store, sampler = _data(study)
    per_stage = args.steps // len(args.stages)
    if per_stage < 1:
        raise DelvmError(f"--steps {args.steps}: give at least one step per stage")
    stages = [{"tasks": [t], "steps": per_stage} for t in args.stages]
    args.steps = per_stage * len(args.stages)  # equal stages; the same total for both arms
    arms = [Arm(f"lr-{policy}", store, [f"stages={stages!r}", f"lr_policy={policy!r}"])
            for policy in ("continue", "rescale")]  # fmt: skip
    results = study.run_arms(arms, sampler)
    matrices = [f"\n## {arm.name}: validation loss after each stage (paper Table 11)\n\n"
                + (study.out / "arms" / arm.name / "stages.md").read_text() for arm in arms]  # fmt: skip
    study.report("Continual learning over ordered task stages (paper Tables 5/11)", results,
                 f"Stages {' -> '.join(args.stages)}, {per_stage} steps each; lr-continue runs "
                 "one cosine over all stages, lr-rescale restarts warmup + cosine per stage.",
                 "".join(matrices))  # fmt: skip


# ---- command line ------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder")
    p.add_argument("--out", type=Path, default=Path(f"runs/experiment-{name}"))
    p.add_argument("--steps", type=int, default=200, help="training steps of every arm")
    p.add_argument("--seed", type=int, default=0, help="training, sampling and toy-world seed")
    p.add_argument("--train-config", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                   help="training override for every arm (repeatable)")  # fmt: skip
    p.add_argument("--resolution", type=int, default=64, help="toy-world image side")
    p.add_argument("--segmentation", type=int, default=400, help="toy-world examples")
    p.add_argument("--pose", type=int, default=40, help="toy-world examples (the tail)")
    p.add_argument("--derain", type=int, default=40, help="toy-world examples (the tail)")
    p.add_argument("--eval-examples", type=int, default=32,
                   help="per task, in the held-out evaluation world (half are scored)")  # fmt: skip


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="the paper's studies: balance, data-scaling, kd, ...")
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, function, text in [
        ("balance", run_balance, "Table 1: unbalanced vs re-sampled vs augmented"),
        ("data-scaling", run_data_scaling, "Figure 2: more real data vs augmented copies"),
        ("kd", run_kd, "Tables 2/3/6: teacher, student, distilled student"),
        ("continual", run_continual, "Tables 5/11: ordered stages, lr continue vs rescale"),
    ]:
        s = studies.add_parser(name, help=text)
        _common(s, name)
        if name != "data-scaling":
            s.add_argument("--store", type=Path, help="train on this store, not the toy world")
        s.set_defaults(func=function, store=None)  # data-scaling always builds toy stores
        if name == "data-scaling":
            s.add_argument("--real-factors", type=int, nargs="+", default=[1, 2, 4])
            s.add_argument("--copies", type=int, nargs="+", default=[1, 3])
        if name == "kd":
            s.add_argument("--teacher", nargs="+", metavar="FIELD=VALUE",
                           default=["num_layers=4", "hidden_size=128", "intermediate_size=352"],
                           help="model overrides that make the teacher")  # fmt: skip
        if name == "continual":
            s.add_argument("--stages", nargs="+", default=list(TOY_TASKS))
