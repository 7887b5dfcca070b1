"""`delvm experiment {balance,data-scaling,kd,continual}`: the paper's studies, one command each.

Every study trains a few *arms* that differ only in what the study tests, once per seed
(`--seeds 0 1 2`: the seed sets the initial weights, the data order and the augmentation draws),
scores each arm's final checkpoint on the same held-out sentences, and tests the paper's claims:
per claim the paired difference between arms over seeds, its 95 % interval and a verdict
(`delvm.experiments.verdicts`). It writes OUT/report.md, OUT/results.json, OUT/loss_curves.png and
one sample grid per arm (OUT/samples/ARM.png, first seed).

- balance (Table 1): unbalanced vs re-sampled vs augmented tail tasks, the last two on one task
  mix (equal tokens per task) differing only in diversity;
- data-scaling (Figure 2): x1 real pose examples, N times as many, and x1 plus N-1 augmented
  copies of each, all on one task mix;
- kd (Tables 2/3/6): a larger teacher, a student from scratch, a student distilled from it;
- continual (Tables 5/11): stages segmentation -> pose -> derain, lr "continue" vs "rescale",
  every task scored after every stage.

The claims' metric is the held-out loss on the target image (the answer a prompt asks for). By
default the data is the built-in toy world (built into OUT/stores and OUT/seed-S/stores),
evaluated on a held-out toy world of another world seed that no seed changes; `--store` runs
balance, kd and continual on an existing store instead, evaluated on its held-out split.
Rerunning the same command resumes: finished stores, arms and scores are reused.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from delvm.data.sampler import SamplerConfig, SentenceSampler
from delvm.data.store import BuildConfig, build_store, open_store
from delvm.errors import DelvmError
from delvm.evaluation.evaluate import evaluate
from delvm.experiments.verdicts import RULE, Interval, interval, verdict
from delvm.inference.prompting import VisualPrompter, save_grid
from delvm.model.checkpoint import load_model
from delvm.tokenizer import load_tokenizer
from delvm.train.cli import open_sentences
from delvm.train.config import TrainConfig, load_config

TOY_TASKS = ("segmentation", "pose", "derain")
EVAL_WORLD_OFFSET = 1_000  # the evaluation world: the same generator, scenes never trained on
EVAL_SEED = 0  # the evaluation sentences are fixed: no training seed changes them
# Training settings the study sets itself, and the option that changes each instead of --set.
STUDY_KEYS = {"out": "--out", "tokenizer": "--tokenizer", "steps": "--steps", "seed": "--seeds",
              "data.seed": "--seeds", "data.store": "--store"}  # fmt: skip

Results = dict[str, dict]  # arm -> task -> scope -> {loss, accuracy, perplexity}


@dataclass(frozen=True)
class Arm:
    """One training run of a study: its store and the training settings that define it.

    `settings` (key -> override text, as `--set` takes it) are applied after `--set`, so no
    `--set` can undo them; `steps` replaces the study's `--steps` (a teacher trained longer);
    `scored_steps` are the checkpoints scored (the final one by default; every stage end for
    continual learning)."""

    name: str
    store: Path
    settings: dict[str, str] = field(default_factory=dict)
    steps: int = 0  # 0: the study's --steps
    scored_steps: tuple[int, ...] = ()

    def scored(self, study_steps: int) -> tuple[int, ...]:
        return self.scored_steps or (self.steps or study_steps,)


@dataclass(frozen=True)
class Claim:
    """A claim of the paper as a number per seed that is positive when the claim holds."""

    text: str
    metric: str
    difference: Callable[[dict], float]  # {arm: {step: Results-like per task}} -> float


def _key_related(a: str, b: str) -> bool:
    """The same setting, or one inside the other (`model.overrides` and `model.overrides.x`)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _overrides(settings: dict) -> list[str]:
    """`key=value` overrides from settings whose values are Python values."""
    return [f"{key}={value!r}" for key, value in settings.items()]


class Study:
    """Shared machinery: toy stores, arms over seeds, scoring, claims and the report."""

    def __init__(self, args: argparse.Namespace, title: str):
        self.args, self.title = args, title
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
        for item in args.set:
            key = item.split("=", 1)[0].strip()
            for fixed, option in STUDY_KEYS.items():
                if _key_related(key, fixed):
                    raise DelvmError(f"--set {item}: the study sets {fixed}; use {option}")
        recorded.write_text(json.dumps(settings, indent=2) + "\n")
        self.tokenizer = load_tokenizer(args.tokenizer)
        self.base = load_config(args.train_config, list(args.set))
        self._builds: dict[Path, BuildConfig] = {}
        self.arms: dict[str, dict] = {}  # name -> what defines it, its model and its task mix
        self.results: dict[int, dict[str, dict[int, Results]]] = {}  # seed -> arm -> step -> ...
        self.claims: list[Claim] = []

    # -- data

    def toy_store(
        self,
        name: str,
        balance: str,
        counts: dict,
        seed: int | None,
        tasks: dict | None = None,
        world: int = 0,
    ) -> Path:
        """A toy-world store (built when first trained on); one source per task so only tail
        tasks augment. `seed` sets the augmentation draws (None: a store without copies, shared
        by every seed); `world` offsets the world seed (the evaluation world)."""
        a = self.args
        sources = [
            {"format": "toyworld", "seed": a.world_seed + world, "resolution": a.resolution,
             **{t: (counts[t] if t == task else 0) for t in TOY_TASKS}}
            for task in TOY_TASKS if counts[task]
        ]  # fmt: skip
        path = self.out / ("stores" if seed is None else f"seed-{seed}/stores") / name
        self._builds[path] = BuildConfig(
            out=str(path), tokenizer=str(a.tokenizer), sources=sources, balance=balance,
            tasks=tasks or {}, seed=seed or 0, shard_size=max(counts.values()),
            augment={"scale": list(a.crop_scale)}, max_copies=max(counts.values()),
        )  # fmt: skip
        return path

    def _ensure_store(self, path: Path) -> None:
        if path in self._builds and not (path / "manifest.json").is_file():
            build_store(self._builds[path])

    def counts(self, pose_factor: int = 1) -> dict:
        a = self.args
        return {"segmentation": a.segmentation, "pose": a.pose * pose_factor, "derain": a.derain}

    def eval_sampler(self) -> SentenceSampler:
        """The held-out sentences every arm of every seed is scored on."""
        d = self.base.data
        if self.args.store:
            store, fraction = self.args.store, d.val_fraction
        else:  # toy world: a separate world of another seed, never trained on
            counts = {t: self.args.eval_examples for t in TOY_TASKS}
            store = self.toy_store("eval", "none", counts, None, world=EVAL_WORLD_OFFSET)
            self._ensure_store(store)
            fraction = 0.5  # half of the evaluation world is scored; the rest is unused
        config = SamplerConfig(
            seq_len=d.seq_len, balance="none", val_fraction=fraction,
            val_sentences=d.val_sentences, seed=EVAL_SEED,
        )  # fmt: skip
        return SentenceSampler(open_store(store, self.tokenizer.fingerprint()), config)

    # -- arms

    def config(self, seed: int, arm: Arm) -> TrainConfig:
        """The arm's training config: the training config, `--set`, the arm's settings, then
        what the study fixes (so neither `--set` nor a whole-table override undoes those)."""
        a = self.args
        fixed = {"out": str(self.out / f"seed-{seed}" / "arms" / arm.name),
                 "tokenizer": str(a.tokenizer), "data.store": str(arm.store),
                 "steps": arm.steps or a.steps,
                 "seed": seed, "data.seed": seed}  # fmt: skip
        scored = arm.scored(a.steps)
        gaps = [scored[0], *(b - c for b, c in zip(scored[1:], scored, strict=False))]
        # Defaults --set may change; room for one checkpoint a kill leaves between scored ones.
        defaults = {"eval_every": scored[-1], "checkpoint_every": min(gaps),
                    "keep_checkpoints": len(scored) + 1}  # fmt: skip
        arm_settings = [f"{key}={text}" for key, text in arm.settings.items()]
        overrides = [*_overrides(defaults), *a.set, *arm_settings, *_overrides(fixed)]
        return load_config(a.train_config, overrides)

    def check_arms(self, arms: list[Arm]) -> None:
        """Refuse a `--set` that an arm's own setting would override, and arms that would train
        the same run."""
        for item in self.args.set:
            key = item.split("=", 1)[0].strip()
            for arm in arms:
                for setting in arm.settings:
                    if key == setting or key.startswith(setting + "."):
                        raise DelvmError(
                            f"--set {item}: {setting} defines arm {arm.name} "
                            f"({setting}={arm.settings[setting]}) and would be ignored; "
                            "change it with the study's own options"
                        )
        from delvm.model.transformer import preset

        seen: dict[str, str] = {}
        for arm in arms:
            config = self.config(self.args.seeds[0], arm)
            values = config.to_dict()
            values.pop("out")  # the model as built, however its fields were given:
            values["model"] = preset(config.model.preset, **config.model.overrides).to_dict()
            text = json.dumps(values, sort_keys=True, default=str)
            if text in seen:
                raise DelvmError(
                    f"arms {seen[text]} and {arm.name} would train the same run (same model, data "
                    "and settings); change the option that defines them"
                )
            seen[text] = arm.name

    def describe(self, seed: int, arm: Arm) -> dict:
        """What defines the arm, its model's size and the task mix it trains on."""
        from delvm.model.transformer import VisualLM
        from delvm.train.trainer import model_config_for

        config = self.config(seed, arm)
        sampler = open_sentences(config)
        with torch.device("meta"):
            model = VisualLM(model_config_for(config, sampler))
        per_step = config.micro_batch * config.grad_accum
        mix = {}
        for task, entry in sampler.task_mix().items():
            draws = per_step * self._steps_on(config, task, entry["share"])
            examples = draws * sampler.examples_per_sentence[task]
            mix[task] = {**entry, "draws_per_distinct": examples / max(entry["distinct"], 1)}
        return {
            "settings": {k: str(v) for k, v in arm.settings.items()},
            "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_size": model.config.hidden_size, "num_layers": model.config.num_layers,
            "steps": config.steps,
            "mix": mix,
        }  # fmt: skip

    @staticmethod
    def _steps_on(config: TrainConfig, task: str, share: float) -> float:
        """Expected optimizer steps' worth of sentences of `task` (stages train one set each)."""
        if not config.stages:
            return config.steps * share
        return sum(s.steps / len(s.tasks) for s in config.stages if task in s.tasks)

    def train(self, seed: int, arm: Arm) -> Path:
        """Train (or resume) an arm; returns its run folder."""
        from delvm.train.state import checkpoint_dirs
        from delvm.train.trainer import Trainer

        self._ensure_store(arm.store)
        config = self.config(seed, arm)
        final = f"step-{config.steps:06d}"
        if not any(p.name == final for p in checkpoint_dirs(config.out)):
            Trainer(config, open_sentences(config)).run()
        if not any(p.name == final for p in checkpoint_dirs(config.out)):  # stopped by a signal
            raise DelvmError(f"{config.out}: stopped before step {config.steps}; rerun to resume")
        return Path(config.out)

    def run(self, arms_for: Callable[[int], list[Arm]]) -> None:
        """Train and score every arm for every seed; a rerun reuses what is already done."""
        self.check_arms(arms_for(self.args.seeds[0]))
        sampler = self.eval_sampler()
        for seed in self.args.seeds:
            per_arm = self.results.setdefault(seed, {})
            for arm in arms_for(seed):
                run = self.train(seed, arm)
                self.arms.setdefault(arm.name, self.describe(seed, arm))
                scored = arm.scored(self.args.steps)
                first = seed == self.args.seeds[0]  # sample grids: the first seed's final model
                per_arm[arm.name] = {
                    step: self.score(run, step, sampler, sample=first and step == scored[-1])
                    for step in scored
                }

    def score(self, run: Path, step: int, sampler: SentenceSampler, sample: bool) -> Results:
        """The checkpoint's held-out metrics (cached beside it), and its sample grid."""
        cache = run / f"scores-step-{step:06d}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        model = load_model(run / "checkpoints" / f"step-{step:06d}").eval()
        result = evaluate(model, sampler)
        if sample:
            self.sample_grid(run.name, model, sampler)
        cache.write_text(json.dumps(result, indent=2) + "\n")
        return result

    # -- outputs

    def sample_grid(self, name: str, model, sampler: SentenceSampler) -> Path:
        """One prompt per two-image task: example pair | query | generated | ground truth."""
        prompter = VisualPrompter(model, self.tokenizer)
        pairs = []  # per task: (example [2, hw], query [2, hw]) from the held-out pool
        for task in sampler.tasks:
            tokens, pool = sampler.val_tokens[task], sampler.val[task]
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

    def loss_curves(self) -> Path:
        """Training loss per arm, the mean over seeds at every logged step."""
        import matplotlib

        matplotlib.use("Agg")  # files only; no display on servers
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in self.arms:
            curves = []
            for seed in self.args.seeds:
                log = self.out / f"seed-{seed}" / "arms" / name / "log.jsonl"
                records = [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
                curves.append({r["step"]: r["loss"] for r in records})
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], label=name)
        ax.set(xlabel="step", ylabel=f"training loss (mean of {len(self.args.seeds)} seeds)",
               title=self.title)  # fmt: skip
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def final(self, seed: int) -> dict[str, Results]:
        """arm -> the final checkpoint's results, for one seed."""
        return {arm: steps[max(steps)] for arm, steps in self.results[seed].items()}

    def verdicts(self) -> list[dict]:
        out = []
        for claim in self.claims:
            per_seed = [claim.difference(self.results[s]) for s in self.args.seeds]
            ci, word = verdict(per_seed)
            out.append({"claim": claim.text, "metric": claim.metric, "per_seed": per_seed,
                        "mean": ci.mean, "low": ci.low, "high": ci.high, "verdict": word})  # fmt: skip
        return out

    def markdown(self, notes: str, link: str = "", extra: str = "") -> str:
        """The study's section: settings, arms, results over seeds, claims, figures. `link`
        prefixes the figure paths (for a page in another folder)."""
        a = self.args
        seeds = " ".join(map(str, a.seeds))
        lines = [
            f"Every arm: {a.steps} steps unless its row below says otherwise, seeds {seeds}, "
            f"training config `{a.train_config}`"
            + (f", `--set` {' '.join(a.set)}" if a.set else "") + ".", "", notes, "",
            "### Arms", "", arms_table(self.arms), "",
            "### Held-out target-image loss (mean over seeds [95 % interval]; per seed)", "",
            results_table(self.arms, self.args.seeds, self.final), "",
            "### Claims", "", RULE, "", claims_table(self.verdicts()), "",
            f"![training loss]({link}loss_curves.png)", "",
            *[f"- {name} (seed {a.seeds[0]}): ![samples]({link}samples/{name}.png)"
              for name in self.arms],
            "", "Sample rows: example input | example output | query | generated | truth.",
            extra,
        ]  # fmt: skip
        return "\n".join(lines) + "\n"

    def report(self, notes: str, extra: str = "") -> Path:
        results = {
            "settings": {k: str(v) for k, v in sorted(vars(self.args).items()) if k != "func"},
            "arms": self.arms, "claims": self.verdicts(),
            "seeds": {str(s): {arm: {str(step): r for step, r in steps.items()}
                               for arm, steps in self.results[s].items()} for s in self.args.seeds},
        }  # fmt: skip
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        self.loss_curves()
        self.notes, self.extra = notes, extra
        path = self.out / "report.md"
        path.write_text(f"# {self.title}\n\n" + self.markdown(notes, extra=extra))
        print(claims_table(results["claims"]))
        print(f"report: {path}")
        return path


# ---- tables --------------------------------------------------------------------------------


def arms_table(arms: dict) -> str:
    """Each arm's defining settings, model and effective task mix."""
    lines = ["| arm | defining settings | parameters | hidden | layers | steps | task: share of "
             "tokens, originals / distinct examples, draws per distinct example |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, arm in arms.items():
        settings = ", ".join(f"`{k}={v}`" for k, v in arm["settings"].items()) or "(none)"
        mix = "; ".join(
            f"{t}: {m['share']:.0%}, {m['originals']} / {m['distinct']}, "
            f"{m['draws_per_distinct']:.0f}"
            for t, m in arm["mix"].items()
        )
        lines.append(f"| {name} | {settings} | {arm['parameters']:,} | {arm['hidden_size']} | "
                     f"{arm['num_layers']} | {arm['steps']} | {mix} |")  # fmt: skip
    return "\n".join(lines)


def results_table(arms: dict, seeds: list[int], final: Callable[[int], dict]) -> str:
    tasks = sorted(next(iter(final(seeds[0]).values())))
    lines = ["| arm | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name in arms:
        cells = []
        for task in tasks:
            values = [final(s)[name][task]["target"]["loss"] for s in seeds]
            per_seed = ", ".join(f"{v:.4f}" for v in values)
            cells.append(f"{interval(values)}; {per_seed}" if len(values) > 1 else per_seed)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_table(claims: list[dict]) -> str:
    lines = ["| claim | per-seed difference (positive = claim holds) | mean [95 % interval] | "
             "verdict |", "|---|---|---|---|"]  # fmt: skip
    for c in claims:
        per_seed = ", ".join(f"{v:+.4f}" for v in c["per_seed"])
        ci = Interval(c["mean"], c["low"], c["high"], len(c["per_seed"]))
        lines.append(f"| {c['claim']} ({c['metric']}) | {per_seed} | {ci} | **{c['verdict']}** |")
    return "\n".join(lines)


def target_loss(results: dict, arm: str, tasks: list[str], step: int | None = None) -> float:
    """Mean held-out target-image loss of `arm` over `tasks` at checkpoint `step` (None: its
    final checkpoint)."""
    by_step = results[arm]
    return float(np.mean([by_step[step or max(by_step)][t]["target"]["loss"] for t in tasks]))


# ---- the four studies ----------------------------------------------------------------------


def _store_or_toy(study: Study, seed: int, balance: str) -> Path:
    """The store the arms train on: --store, or the toy world (with this seed's augmented
    copies under `augment`; one store for every seed otherwise)."""
    if study.args.store:
        return study.args.store
    if balance == "augment":
        return study.toy_store("augment", balance, study.counts(), seed)
    return study.toy_store("originals", "none", study.counts(), None)


def _task_counts(study: Study) -> dict[str, int]:
    if study.args.store:
        return {t: s.num_examples for t, s in open_store(study.args.store).tasks.items()}
    return study.counts()


HEAD_MARGIN = 0.02  # "without hurting the head task materially": at most 2 % more loss


def run_balance(args: argparse.Namespace) -> Study:
    study = Study(args, "Balancing long-tailed tasks (paper Table 1)")
    counts = _task_counts(study)
    head = max(counts, key=counts.get)
    tails = sorted(t for t in counts if counts[t] < counts[head])
    if not tails:
        raise DelvmError(f"tasks {counts}: every task has as many examples; nothing is a tail")
    steps = args.steps

    def arms_for(seed: int) -> list[Arm]:
        store = _store_or_toy(study, seed, "augment")  # "none" and "resample" draw its originals
        return [Arm(name, store, {"data.balance": repr(mode)}) for name, mode in
                [("unbalanced", "none"), ("resampled", "resample"), ("augmented", "augment")]]  # fmt: skip

    def tail(r: dict, arm: str) -> float:
        return target_loss(r, arm, tails, steps)

    def headloss(r: dict, arm: str) -> float:
        return target_loss(r, arm, [head], steps)

    tail_metric = f"target loss, mean of {', '.join(tails)}"
    study.claims = [
        Claim("augmented beats re-sampled on the tail tasks", tail_metric,
              lambda r: tail(r, "resampled") - tail(r, "augmented")),
        Claim(f"augmented is at most {HEAD_MARGIN:.0%} worse than re-sampled on the head task",
              f"{HEAD_MARGIN:.0%} of re-sampled's {head} target loss minus the excess",
              lambda r: HEAD_MARGIN * headloss(r, "resampled")
              - (headloss(r, "augmented") - headloss(r, "resampled"))),
        Claim("re-sampled beats unbalanced on the tail tasks", tail_metric,
              lambda r: tail(r, "unbalanced") - tail(r, "resampled")),
        Claim("augmented beats unbalanced on the tail tasks", tail_metric,
              lambda r: tail(r, "unbalanced") - tail(r, "augmented")),
    ]  # fmt: skip
    study.run(arms_for)
    study.report(
        f"Head task: {head}; tail tasks: {', '.join(tails)}. Unbalanced: natural proportions of "
        "the originals; re-sampled: equal tokens per task, tail originals repeated; augmented: "
        "the same equal mix, each draw a random one of the example's stored augmented copies "
        f"(RandomResizedCrop scale {tuple(args.crop_scale)} + flips, drawn per seed)."
    )
    return study


def run_data_scaling(args: argparse.Namespace) -> Study:
    study = Study(args, "More real data vs more augmented copies of the tail task (paper Figure 2)")
    n = args.factor
    if n < 2:
        raise DelvmError(f"--factor {n}: compare x1 with at least twice the real data")
    real_n, augmented = f"real-x{n}", f"augmented-c{n - 1}"
    steps = args.steps

    def arms_for(seed: int) -> list[Arm]:
        # One task mix for all three (equal tokens per task): only the pose data differs.
        copies = {"pose": {"copies": n - 1}, "derain": {"copies": 0}}  # only the studied task
        return [
            Arm("real-x1", study.toy_store("real-x1", "none", study.counts(), None),
                {"data.balance": "'resample'"}),
            Arm(real_n, study.toy_store(real_n, "none", study.counts(n), None),
                {"data.balance": "'resample'"}),
            Arm(augmented, study.toy_store(augmented, "augment", study.counts(), seed, copies),
                {"data.balance": "'augment'"}),
        ]  # fmt: skip

    def pose(r: dict, arm: str) -> float:
        return target_loss(r, arm, ["pose"], steps)

    study.claims = [
        Claim(f"{n}x real pose data beats x1", "pose target loss",
              lambda r: pose(r, "real-x1") - pose(r, real_n)),
        Claim(f"{n - 1} augmented copies beat x1", "pose target loss",
              lambda r: pose(r, "real-x1") - pose(r, augmented)),
        Claim(f"{n - 1} augmented copies recover at least half of the gain of {n}x real data",
              "gain of augmented minus half the gain of real, pose target loss",
              lambda r: (pose(r, "real-x1") - pose(r, augmented))
              - 0.5 * (pose(r, "real-x1") - pose(r, real_n))),
    ]  # fmt: skip
    study.run(arms_for)
    shares = [
        (pose(r, "real-x1") - pose(r, augmented)) / (pose(r, "real-x1") - pose(r, real_n))
        for r in (study.results[s] for s in args.seeds)
    ]
    study.report(
        f"Tail task: pose, {args.pose} real examples at x1. Every arm trains on equal tokens per "
        f"task; {real_n}: {n} times the real pose examples; {augmented}: the x1 examples plus "
        f"{n - 1} augmented copies of each (as many pose examples as {real_n}). Share of the "
        f"real-data gain the copies recover, per seed: {', '.join(f'{s:.2f}' for s in shares)}."
    )
    return study


def run_kd(args: argparse.Namespace) -> Study:
    study = Study(args, "Knowledge distillation (paper Tables 2/3/6)")
    teacher_steps = args.teacher_steps or args.steps
    teacher_fields = {}
    for item in args.teacher:
        if "=" not in item:
            raise DelvmError(f"--teacher {item!r}: give FIELD=VALUE, e.g. num_layers=4")
        name, value = item.split("=", 1)
        teacher_fields[f"model.overrides.{name.strip()}"] = value.strip()

    def arms_for(seed: int) -> list[Arm]:
        store = _store_or_toy(study, seed, study.base.data.balance)
        run = study.out / f"seed-{seed}" / "arms" / "teacher"
        teacher = run / "checkpoints" / f"step-{teacher_steps:06d}"
        return [Arm("teacher", store, teacher_fields, teacher_steps), Arm("student", store),
                Arm("student-kd", store, {"distill.teacher": repr(str(teacher))})]  # fmt: skip

    tasks = list(_task_counts(study))

    def loss(r: dict, arm: str) -> float:
        return target_loss(r, arm, tasks)

    metric = "target loss, mean of every task"
    study.claims = [
        Claim("the distilled student beats the student from scratch", metric,
              lambda r: loss(r, "student") - loss(r, "student-kd")),
        Claim("the teacher beats the distilled student", metric,
              lambda r: loss(r, "student-kd") - loss(r, "teacher")),
        Claim("the teacher beats the student from scratch", metric,
              lambda r: loss(r, "student") - loss(r, "teacher")),
    ]  # fmt: skip
    study.run(arms_for)
    study.report(
        f"Teacher: the training config's model with {' '.join(args.teacher)}, {teacher_steps} "
        "steps (a teacher trained beforehand, as the paper's); students: the training config's "
        f"model, {args.steps} steps each on the same data, from scratch and distilled from the "
        "teacher of the same seed."
    )
    return study


def run_continual(args: argparse.Namespace) -> Study:
    if len(args.stages) < 2:
        raise DelvmError(f"--stages {args.stages}: continual learning needs two stages or more")
    per_stage = args.steps // len(args.stages)
    if per_stage < 1:
        raise DelvmError(f"--steps {args.steps}: give at least one step per stage")
    args.steps = per_stage * len(args.stages)  # equal stages; the same total for both arms
    study = Study(args, "Continual learning over ordered task stages (paper Tables 5/11)")
    stages = [{"tasks": [t], "steps": per_stage} for t in args.stages]
    ends = tuple(per_stage * (i + 1) for i in range(len(stages)))
    last = args.stages[-1]

    def arms_for(seed: int) -> list[Arm]:
        store = _store_or_toy(study, seed, study.base.data.balance)
        return [Arm(f"lr-{policy}", store, {"stages": repr(stages), "lr_policy": repr(policy)},
                    scored_steps=ends)
                for policy in ("continue", "rescale")]  # fmt: skip

    def forgetting(r: dict, arm: str) -> float:
        """Mean rise of each earlier stage's task loss from its own stage's end to the last's."""
        return float(np.mean([target_loss(r, arm, [t], ends[-1]) - target_loss(r, arm, [t], end)
                              for t, end in zip(args.stages[:-1], ends, strict=False)]))  # fmt: skip

    metric = f"target loss rise of {', '.join(args.stages[:-1])} after later stages"
    study.claims = [
        Claim("lr-continue forgets earlier tasks", metric, lambda r: forgetting(r, "lr-continue")),
        Claim("lr-rescale forgets earlier tasks", metric, lambda r: forgetting(r, "lr-rescale")),
        Claim("lr rescaling lowers the last task's loss", f"{last} target loss after the last stage",
              lambda r: target_loss(r, "lr-continue", [last], ends[-1])
              - target_loss(r, "lr-rescale", [last], ends[-1])),
        Claim("lr rescaling increases forgetting", metric,
              lambda r: forgetting(r, "lr-rescale") - forgetting(r, "lr-continue")),
    ]  # fmt: skip
    study.run(arms_for)
    study.report(
        f"Stages {' -> '.join(args.stages)}, {per_stage} steps each; lr-continue runs one cosine "
        "over all stages, lr-rescale restarts warmup + cosine per stage. Every task is scored "
        "after every stage on the evaluation world.",
        extra=stage_tables(study, ends),
    )
    return study


def stage_tables(study: Study, ends: tuple[int, ...]) -> str:
    """Paper Table 11: every task's target loss after every stage, mean over seeds."""
    seeds = study.args.seeds
    tasks = sorted(study.results[seeds[0]][next(iter(study.arms))][ends[0]])
    text = []
    for arm in study.arms:
        lines = [f"\n### {arm}: held-out target loss after each stage (mean over seeds)\n",
                 "| after stage (trained on) | " + " | ".join(tasks) + " |",
                 "|---" * (len(tasks) + 1) + "|"]  # fmt: skip
        for i, (end, stage) in enumerate(zip(ends, study.args.stages, strict=True)):
            cells = [
                f"{np.mean([study.results[s][arm][end][t]['target']['loss'] for s in seeds]):.4f}"
                for t in tasks
            ]
            lines.append(f"| {i + 1} ({stage}) | " + " | ".join(cells) + " |")
        text.append("\n".join(lines))
    return "\n".join(text) + "\n"


STUDIES = {
    "balance": (run_balance, "Table 1: unbalanced vs re-sampled vs augmented"),
    "data-scaling": (run_data_scaling, "Figure 2: more real data vs augmented copies"),
    "kd": (run_kd, "Tables 2/3/6: teacher, student, distilled student"),
    "continual": (run_continual, "Tables 5/11: ordered stages, lr continue vs rescale"),
}


# ---- command line --------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder")
    p.add_argument("--out", type=Path, default=Path(f"runs/experiment-{name}"))
    p.add_argument("--steps", type=int, default=200, help="training steps of every arm")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run of every arm per seed: initial weights, data order and "
                        "augmentation draws (the evaluation world stays)")  # fmt: skip
    p.add_argument("--train-config", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                   help="training override for every arm (repeatable); what defines an arm "
                        "(its model, balance mode, lr policy) is applied after it")  # fmt: skip
    p.add_argument("--world-seed", type=int, default=0, help="the toy world's scenes")
    p.add_argument("--resolution", type=int, default=64, help="toy-world image side")
    p.add_argument("--segmentation", type=int, default=400, help="toy-world examples")
    p.add_argument("--pose", type=int, default=40, help="toy-world examples (the tail)")
    p.add_argument("--derain", type=int, default=40, help="toy-world examples (the tail)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.5, 1.0], metavar=("LO", "HI"),
                   help="augmented copies' RandomResizedCrop area range (the paper: 0.08 1)")  # fmt: skip
    p.add_argument("--eval-examples", type=int, default=32,
                   help="per task, in the held-out evaluation world (half are scored)")  # fmt: skip


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="the paper's studies: balance, data-scaling, kd, ...")
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, (function, text) in STUDIES.items():
        s = studies.add_parser(name, help=text)
        _common(s, name)
        if name != "data-scaling":
            s.add_argument("--store", type=Path, help="train on this store, not the toy world")
        s.set_defaults(func=function, store=None)  # data-scaling always builds toy stores
        if name == "data-scaling":
            s.add_argument("--factor", type=int, default=4,
                           help="N: x1 vs N times the real pose data vs x1 + N-1 copies")  # fmt: skip
        if name == "kd":
            s.add_argument("--teacher", nargs="+", metavar="FIELD=VALUE",
                           default=["num_layers=4", "hidden_size=128", "intermediate_size=352"],
                           help="model overrides that make the teacher")  # fmt: skip
            s.add_argument("--teacher-steps", type=int, default=0,
                           help="the teacher's training steps (default: --steps)")  # fmt: skip
        if name == "continual":
            s.add_argument("--stages", nargs="+", default=list(TOY_TASKS))
    from delvm.experiments.reproduce import add_command

    add_command(studies)
