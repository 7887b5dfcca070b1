"""Training configuration: dataclasses read from a TOML file plus ``section.key=value`` overrides,
every value checked against its field's annotation (`typed_settings`).

One config describes pretraining, distillation (``[distill]``), continual stages (``[[stages]]``)
and fine-tuning (``init_from``). The tokens per optimizer step are derived, not set:
``micro_batch x grad_accum x world_size x seq_len`` (the paper: 262,144).
"""

from __future__ import annotations

import ast
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from delvm.configs import find_config
from delvm.errors import DelvmError
from delvm.model.transformer import ModelConfig
from delvm.train.precision import PRECISIONS


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields: {num_layers = 4}

    def __post_init__(self) -> None:
        self.overrides = typed_settings(ModelConfig, self.overrides, "config", "model.overrides.")


@dataclass
class DataSection:
    store: str = ""  # token store folder (delvm data build)
    seq_len: int = 2048  # context; k examples per sentence fill it
    balance: str = "augment"  # none | resample | augment (augment: copies are in the store)
    task_weights: dict[str, float] = field(default_factory=dict)  # task -> relative weight
    val_fraction: float = 0.05  # held-out share of each task's original examples
    # task -> a store of its own validation set (e.g. pose = MPII's): that task trains on all of
    # `store` and validates on all of this one (delvm.data.sampler)
    val_stores: dict[str, str] = field(default_factory=dict)
    val_sentences: int = 16  # per task, for the validation metrics
    seed: int = 0
    answer_noise: float = 0.0  # noisy teacher forcing (delvm.data.sampler); 0 = off

    def __post_init__(self) -> None:
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
    w_kd: float = 1.0  # 0: the teacher is not run on the batch (only its answers are learnt)
    temperature: float = 1.0
    # data: learn every sentence as stored | teacher: learn the teacher's own greedy answer to
    # each sentence's prompt, on the answer only (a draft for speculative decoding)
    answers: str = "data"


@dataclass
class StageSection:
    """One continual-learning stage: train on `tasks` for `steps` optimizer steps. Under
    ``lr_policy = "rescale"`` a stage may set its own peak `lr` and floor `min_lr` (paper Table
    10: each later stage peaks lower); unset, they are ``[optim]``'s."""

    tasks: list[str] = field(default_factory=list)
    steps: int = 0
    lr: float | None = None
    min_lr: float | None = None


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
    precision: str = "auto"  # auto (bf16 where bf16 matmuls are native, else fp32) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # full: rank 0 writes the gathered model and optimizer | sharded: each rank writes its shards
    # (torch.distributed.checkpoint) | auto: sharded for FSDP on several ranks, else full
    checkpoint_format: str = "auto"
    eval_every: int = 100
    log_every: int = 10
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per device, for the logged MFU (e.g. 989 for an H100/H200 in bf16)
    lr_policy: str = "continue"  # continual stages: continue (one cosine) | rescale (per stage)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    distill: DistillSection = field(default_factory=DistillSection)
    stages: list[StageSection] = field(default_factory=list)  # empty: one stage, all tasks

    def __post_init__(self) -> None:
        choices = {"parallel": ("ddp", "fsdp"), "precision": PRECISIONS,
                   "lr_policy": ("continue", "rescale"),
                   "checkpoint_format": ("auto", "full", "sharded")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DelvmError(f"config {name} = {getattr(self, name)!r}: use one of {allowed}")
        if self.data.balance not in ("none", "resample", "augment"):
            raise DelvmError(f"config data.balance = {self.data.balance!r}: none|resample|augment")
        self._check_distill()
        if self.stages and sum(s.steps for s in self.stages) != self.steps:
            raise DelvmError(
                f"config stages add up to {sum(s.steps for s in self.stages)} steps but steps = "
                f"{self.steps}; make them agree"
            )
        for i, stage in enumerate(self.stages):
            own = [name for name in ("lr", "min_lr") if getattr(stage, name) is not None]
            if own and self.lr_policy != "rescale":
                raise DelvmError(
                    f"config stages[{i}].{own[0]} is set but lr_policy = {self.lr_policy!r} runs "
                    'one cosine at optim.lr; set lr_policy = "rescale" for per-stage lrs'
                )
            optim = self.stage_optim(i)
            if own and not 0 <= optim.min_lr <= optim.lr:
                raise DelvmError(
                    f"config stages[{i}]: min_lr {optim.min_lr} must lie in 0..lr ({optim.lr})"
                )

    def _check_distill(self) -> None:
        d = self.distill
        if d.answers not in ("data", "teacher"):
            raise DelvmError(f"config distill.answers = {d.answers!r}: use 'data' or 'teacher'")
        if d.w_gt < 0 or d.w_kd < 0:
            raise DelvmError("config distill.w_gt and distill.w_kd must be >= 0")
        if d.answers == "teacher" and not d.teacher:
            raise DelvmError(
                "config distill.answers = 'teacher' needs distill.teacher: set the teacher whose "
                "answers to learn"
            )
        if d.answers == "teacher" and self.data.answer_noise > 0:
            raise DelvmError(
                "config distill.answers = 'teacher' learns the teacher's answers to clean prompts, "
                f"but data.answer_noise = {self.data.answer_noise}; set data.answer_noise = 0"
            )

    def stage_optim(self, index: int) -> OptimSection:
        """``[optim]`` with stage ``index``'s own lr / min_lr where it sets them."""
        stage = self.stages[index]
        own = {name: getattr(stage, name) for name in ("lr", "min_lr")}
        return replace(self.optim, **{k: v for k, v in own.items() if v is not None})

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens per optimizer step on ``world_size`` ranks (the paper's 262,144)."""
        return self.micro_batch * self.grad_accum * world_size * self.data.seq_len

    def to_dict(self) -> dict:
        values = asdict(self)
        # A stage's unset lr / min_lr are left out: a checkpoint whose config predates them
        # compares equal on resume.
        values["stages"] = [
            {k: v for k, v in stage.items() if v is not None} for stage in values["stages"]
        ]
        return values


def build_config(cls: type, values: dict, where: str, key: str = "") -> Any:
    """The dataclass ``cls`` built from a dict of settings, checked as `typed_settings` does."""
    return cls(**typed_settings(cls, values, where, key))


def typed_settings(cls: type, values: dict, where: str, key: str = "") -> dict:
    """``values`` for the dataclass ``cls``, each checked against its field's annotation and
    converted (nested dataclasses built, ints widened to floats, lists made tuples). An unknown
    key or a value of another type is a DelvmError naming it: ``where`` is the file, ``key`` the
    table the values sit in (e.g. ``"data."``)."""
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in fields(cls) if f.init)
    unknown = sorted(set(values) - set(known))
    if unknown:
        named = [key + name for name in unknown]
        raise DelvmError(f"{where}: unknown setting(s) {named}; known: {known}")
    return {name: _typed(hints[name], value, where, key + name) for name, value in values.items()}


def _describe(hint: Any) -> str:
    """A type annotation in a config's words: 'an integer', 'a list of 2 values', ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("nothing" if a is type(None) else _describe(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} values"
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    if origin is dict or hint is dict or is_dataclass(hint):
        return "a table"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "any value")


def _typed(hint: Any, value: Any, where: str, key: str) -> Any:
    """``value`` as the annotated type ``hint``, or a DelvmError naming the key, the value and the
    type expected. Bools are not integers here: TOML keeps them apart, Python does not."""

    def refuse(fix: str = "") -> NoReturn:
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML spells it
        raise DelvmError(f"{where}: {key} = {shown} must be {_describe(hint)}{fix}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if is_dataclass(hint):
        if not isinstance(value, dict):
            refuse(f"; set one key at a time, e.g. {key}.NAME=VALUE")
        return build_config(hint, value, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(option, value, where, key)
            except DelvmError:
                pass
        refuse()
    if hint in (bool, int, float, str):
        if isinstance(value, bool) != (hint is bool):
            refuse()
        if hint is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, hint):
            refuse(" (quote it to mean text)" if hint is str else "")
        return value
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, list | tuple):
            refuse()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                refuse()
            items = args
        else:
            items = (args[0] if args else Any,) * len(value)
        checked = [
            _typed(t, v, where, f"{key}[{i}]")
            for i, (t, v) in enumerate(zip(items, value, strict=True))
        ]
        return (origin or hint)(checked)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            refuse(f"; set one key at a time, e.g. {key}.NAME=VALUE")
        kind = args[1] if args else Any
        return {name: _typed(kind, v, where, f"{key}.{name}") for name, v in value.items()}
    raise TypeError(f"{key}: a config field cannot be annotated {hint!r}")  # a programming error


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
