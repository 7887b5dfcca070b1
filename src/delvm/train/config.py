"""Training configuration: dataclasses read from a TOML file plus ``section.key=value`` overrides.

One config describes pretraining, distillation (``[distill]``), continual stages (``[[stages]]``)
and fine-tuning (``init_from``). The tokens per optimizer step are derived, not set:
``micro_batch x grad_accum x world_size x seq_len`` (the paper: 262,144).
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from delvm.configs import find_config
from delvm.errors import DelvmError
from delvm.train.precision import PRECISIONS


def _check_table(name: str, value: Any, example: str) -> None:
    """A table setting given as a plain value (e.g. a TOML inline table typed on the command line,
    which overrides do not parse) fails here, before any work starts."""
    if not isinstance(value, dict):
        raise DelvmError(
            f"config {name} = {value!r}: it must be a table; override one key at a time, "
            f"e.g. {example}"
        )


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # any ModelConfig field, e.g. {num_layers = 4}

    def __post_init__(self) -> None:
        _check_table("model.overrides", self.overrides, "model.overrides.num_layers=4")


@dataclass
class DataSection:
    store: str = ""  # token store folder (delvm data build)
    seq_len: int = 2048  # context; k examples per sentence fill it
    balance: str = "augment"  # none | resample | augment (augment: copies are in the store)
    task_weights: dict = field(default_factory=dict)  # task -> relative weight override
    val_fraction: float = 0.05  # held-out share of each task's original examples
    val_sentences: int = 16  # per task, for the validation metrics
    seed: int = 0
    answer_noise: float = 0.0  # noisy teacher forcing (delvm.data.sampler); 0 = off

    def __post_init__(self) -> None:
        _check_table("data.task_weights", self.task_weights, "data.task_weights.pose=2")
        self.sampler_config()  # the sampler's own checks, before any data is read

    def sampler_config(self):  # -> delvm.data.sampler.SamplerConfig (imported here: torch)
        """This section's settings for the sentence sampler (all but the store)."""
        from delvm.data.sampler import SamplerConfig

        return SamplerConfig(
            seq_len=self.seq_len, balance=self.balance, task_weights=self.task_weights,
            val_fraction=self.val_fraction, val_sentences=self.val_sentences, seed=self.seed,
            answer_noise=self.answer_noise,
        )  # fmt: skip


@dataclass
class OptimSection:
    lr: float = 1.5e-4
    min_lr: float = 1.5e-5
    warmup_ratio: float = 0.0056  # 0.56 % of the steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class DistillSection:
    teacher: str = ""  # a delvm checkpoint or a Hugging Face llama / internlm folder
    w_gt: float = 1.0
    w_kd: float = 1.0
    temperature: float = 1.0


@dataclass
class StageSection:
    """One continual-learning stage: train on `tasks` for `steps` optimizer steps."""

    tasks: list = field(default_factory=list)
    steps: int = 0


@dataclass
class TrainConfig:
    out: str = "runs/tiny"
    tokenizer: str = ""  # tokenizer folder; its fingerprint must match the store's
    init_from: str = ""  # fine-tuning: start from this checkpoint's weights
    steps: int = 100
    micro_batch: int = 1
    grad_accum: int = 1
    seed: int = 0
    parallel: str = "ddp"  # ddp | fsdp
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 100
    log_every: int = 10
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per device, for the logged MFU (e.g. 989 for an H100/H200 in bf16)
    lr_policy: str = "continue"  # continual stages: continue (one cosine) | rescale (per stage)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    distill: DistillSection = field(default_factory=DistillSection)
    stages: list = field(default_factory=list)  # [StageSection]; empty: one stage, all tasks

    def __post_init__(self) -> None:
        choices = {"parallel": ("ddp", "fsdp"), "precision": PRECISIONS,
                   "lr_policy": ("continue", "rescale")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DelvmError(f"config {name} = {getattr(self, name)!r}: use one of {allowed}")
        if self.data.balance not in ("none", "resample", "augment"):
            raise DelvmError(f"config data.balance = {self.data.balance!r}: none|resample|augment")
        if self.stages and sum(s.steps for s in self.stages) != self.steps:
            raise DelvmError(
                f"config stages add up to {sum(s.steps for s in self.stages)} steps but steps = "
                f"{self.steps}; make them agree"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def build_config(cls: type, values: dict, where: str) -> Any:
    """Instantiate a (nested) dataclass from a dict, naming unknown keys."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DelvmError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        if is_dataclass(default) and isinstance(value, dict):
            value = build_config(type(default), value, f"{where}.{name}")
        elif name == "stages":
            value = [
                build_config(StageSection, v, f"{where}.stages[{i}]") for i, v in enumerate(value)
            ]
        elif name == "betas":
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """Override values: Python/TOML-like literals (3, 1e-4, true, [1, 2], 'x'), else a string."""
    lowered = {"true": True, "false": False}.get(text.lower())
    if lowered is not None:
        return lowered
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(values: dict, override: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict of settings."""
    if "=" not in override:
        raise DelvmError(f"override {override!r} must look like section.key=value")
    key, text = override.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = _parse_value(text.strip())


def load_config(
    path: str | Path | None, overrides: list[str] = (), schema: type = TrainConfig
) -> Any:
    """Read a TOML config (or the defaults) into ``schema`` (a dataclass; default the LVM
    trainer's) and apply ``section.key=value`` overrides."""
    values: dict = {}
    if path is not None:
        path = find_config(path)
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise DelvmError(f"{path}: invalid TOML ({err})") from None
    for override in overrides:
        apply_override(values, override)
    try:
        return build_config(schema, values, str(path or "config"))
    except TypeError as err:
        raise DelvmError(f"{path or 'config'}: {err}") from None
