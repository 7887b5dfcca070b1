"""The training loop: pretraining, distillation, continual stages and fine-tuning in one place.

Read it top to bottom: build the world, the data, the model (and a teacher), resume if a
checkpoint exists, then for each optimizer step: set the lr, accumulate gradients over
micro-batches, clip, step, log, evaluate and checkpoint. SIGTERM / SIGINT write a checkpoint at
the next step boundary and stop; a non-finite loss stops the run with the last good checkpoint
kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from delvm.data.sampler import SentenceBatch
from delvm.errors import DelvmError
from delvm.evaluation.metrics import TaskMetrics
from delvm.inference.generate import Generator
from delvm.model.checkpoint import load_model, save_weights
from delvm.model.transformer import ModelConfig, VisualLM, preset
from delvm.train.config import TrainConfig
from delvm.train.distill import IGNORE, kd_loss, load_teacher
from delvm.train.distributed import World, all_reduce_mean, barrier, init_world, wrap_model
from delvm.train.optim import build_optimizer, stage_lr
from delvm.train.precision import training_autocast
from delvm.train.state import (
    StopSignals,
    checkpoint_dirs,
    read_training_state,
    restore_training_state,
    save_training_checkpoint,
)


class SentenceSource(Protocol):
    """What the trainer needs from the data: deterministic batches addressed by position.

    A batch is a function of (step, micro-batch, rows) alone, so resuming at a step replays
    exactly what an uninterrupted run would see, and ranks take disjoint rows of one global
    batch (a 2-rank run sees the same data as a 1-rank run with the same global batch).
    """

    tasks: list[str]
    image_tokens: int  # tokens per image (the target scope of the metrics)
    vocab_size: int
    tokenizer_fingerprint: str | None

    def train_batch(
        self, step: int, micro: int, rows: range, tasks: list[str]
    ) -> SentenceBatch: ...

    def val_batches(self, batch_size: int) -> list[SentenceBatch]: ...

    def codebook(self) -> Tensor | None: ...


def model_config_for(config: TrainConfig, source: SentenceSource) -> ModelConfig:
    """The preset with overrides; vocab (and codebook width) from the data, context checked."""
    overrides = {"vocab_size": source.vocab_size}
    codebook = source.codebook()
    if codebook is not None:
        overrides["codebook_dim"] = codebook.shape[1]
    model_config = preset(config.model.preset, **{**overrides, **config.model.overrides})
    if model_config.max_seq_len < config.data.seq_len - 1:
        raise DelvmError(
            f"model max_seq_len {model_config.max_seq_len} < data.seq_len - 1; raise "
            "model.overrides.max_seq_len or lower data.seq_len"
        )
    return model_config


def stage_plan(config: TrainConfig, tasks: list[str]) -> list[tuple[int, int, list[str]]]:
    """[(first_step, steps, tasks)] for each stage; one stage of every task by default."""
    if not config.stages:
        return [(0, config.steps, tasks)]
    plan, first = [], 0
    for stage in config.stages:
        unknown = sorted(set(stage.tasks) - set(tasks))
        if unknown:
            raise DelvmError(f"config stages: tasks {unknown} are not in the store ({tasks})")
        plan.append((first, stage.steps, list(stage.tasks)))
        first += stage.steps
    return plan


def lr_schedule(
    config: TrainConfig, plan: list[tuple[int, int, list[str]]]
) -> Callable[[int], float]:
    """The lr the trainer sets for optimizer step ``step`` (0-based) over `stage_plan`'s stages:
    warmup + cosine by ``lr_policy``, each stage at its own lr / min_lr where it sets them."""
    stage_optims = [config.stage_optim(i) for i in range(len(config.stages))] or None
    return partial(stage_lr, stage_bounds=[(first, steps) for first, steps, _ in plan],
                   policy=config.lr_policy, optim=config.optim, stage_optims=stage_optims)  # fmt: skip


class Trainer:
    def __init__(self, config: TrainConfig, source: SentenceSource, world: World | None = None):
        self.config, self.source = config, source
        self.world = world or init_world()
        self.out = Path(config.out)
        self.device = self.world.device
        torch.manual_seed(config.seed)

        self.model_config = model_config_for(config, source)
        codebook = None
        if self.model_config.embedding == "codebook":
            codebook = source.codebook()
            if codebook is None:
                raise DelvmError(
                    "the codebook embedding needs the tokenizer's codebook: set `tokenizer` in "
                    "the config, or model.overrides.embedding = 'learned'"
                )
        with torch.device(self.device):
            bare = VisualLM(self.model_config, codebook=codebook)
        if config.init_from:
            # Fine-tuning: start from a checkpoint's weights (delvm or Hugging Face folder).
            start = load_model(config.init_from, self.device)
            if start.config != self.model_config:
                raise DelvmError(
                    f"{config.init_from}: its model config differs from this run's "
                    f"({start.config} vs {self.model_config}); set model.preset/overrides to match"
                )
            bare.load_state_dict(start.state_dict())
        if config.activation_checkpointing:
            for block in bare.blocks:
                block.forward = _checkpointed(block.forward)
        self.bare = bare
        self.model = wrap_model(bare, self.world, config.parallel)
        self.sharded_checkpoints = config.checkpoint_format == "sharded" or (
            config.checkpoint_format == "auto" and config.parallel == "fsdp" and self.world.size > 1
        )
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = build_optimizer(self.model, config.optim)
        self.teacher = self.answerer = None
        if config.distill.teacher:
            self.teacher = load_teacher(
                config.distill.teacher, bare, self.device, source.tokenizer_fingerprint
            )
        if config.distill.answers == "teacher":
            self.answerer = Generator(self.teacher)

        self.plan = stage_plan(config, source.tasks)
        self.tokens_per_step = config.tokens_per_step(self.world.size)
        self.autocast = training_autocast(config.precision, self.device)
        self.step = 0
        self.history: list[dict] = []
        self.stage_results: list[dict] = []

    # ---- checkpoints -------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the latest checkpoint in ``out`` if there is one."""
        found = checkpoint_dirs(self.out)
        if not found:
            return
        latest = found[-1]
        state = read_training_state(latest)
        saved = state["config"]
        mine = self.config.to_dict()
        for key in ("model", "tokenizer", "data", "grad_accum", "seed", "stages"):
            if json.dumps(saved.get(key), sort_keys=True) != json.dumps(
                mine.get(key), sort_keys=True
            ):
                raise DelvmError(
                    f"{latest}: checkpoint was written with a different {key!r} setting; resume "
                    f"with the same config or choose a new `out` folder"
                )
        # Either format resumes on any number of ranks that together read the same rows of
        # every global batch (micro_batch x ranks): the same data and the same loss.
        ranks, rows = state["world_size"], saved["micro_batch"] * state["world_size"]
        if self.config.micro_batch * self.world.size != rows:
            fix = (
                f"set micro_batch = {rows // self.world.size}"
                if rows % self.world.size == 0
                else f"resume with {ranks} ranks"
            )
            raise DelvmError(
                f"{latest}: written by {ranks} ranks x micro_batch {saved['micro_batch']} = "
                f"{rows} rows per micro-step, resumed by {self.world.size} x "
                f"{self.config.micro_batch}; {fix} to keep the same batches"
            )
        restore_training_state(latest, state, self.model, self.optimizer)
        self.step = state["step"]
        self.history = state.get("history", [])
        self.stage_results = state.get("stage_results", [])
        if self.world.is_main:
            print(f"resumed from {latest} at step {self.step}")

    def save(self) -> Path | None:
        extra = {
            "config": self.config.to_dict(),
            "world_size": self.world.size,
            "history": self.history,
            "stage_results": self.stage_results,
        }
        fingerprint = self.source.tokenizer_fingerprint
        folder = save_training_checkpoint(
            self.out, self.step, self.model, self.optimizer, extra, self.world.is_main,
            self.config.keep_checkpoints,
            lambda state, tmp: save_weights(self.model_config, state, tmp, fingerprint),
            sharded=self.sharded_checkpoints,
        )  # fmt: skip
        barrier(self.world)
        return folder

    # ---- one optimizer step ------------------------------------------------------------------

    def _loss(self, ids: Tensor, inputs: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """The loss on `ids`; the model reads `inputs` (noisy answers) where given."""
        labels = ids[:, 1:]
        if self.answerer is not None:
            ids, labels = self._teacher_answers(ids)
        inputs = ids[:, :-1] if inputs is None else inputs
        with self.autocast:
            logits = self.forward(inputs)
        if self.teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            return loss, {}
        d = self.config.distill
        teacher_logits = None
        if d.w_kd > 0:
            with torch.no_grad(), self.autocast:
                teacher_logits = self.teacher(inputs)
        loss, loss_gt, loss_kd = kd_loss(
            logits, teacher_logits, labels, d.w_gt, d.w_kd, d.temperature
        )
        return loss, {"loss_gt": loss_gt.item(), "loss_kd": loss_kd.item()}

    def _teacher_answers(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``distill.answers = "teacher"``: each sentence with its last image replaced by the
        teacher's greedy answer to the rest, and labels on that answer only: a draft model
        learns to predict what the teacher will say, which is what speculative decoding
        keeps (`delvm.inference.generate`)."""
        n = self.source.image_tokens
        answer = self.answerer(ids[:, :-n], n)
        ids = torch.cat([ids[:, :-n], answer], dim=1)
        labels = ids[:, 1:].clone()
        labels[:, :-n] = IGNORE
        return ids, labels

    def train_step(self, tasks: list[str]) -> dict[str, float]:
        config, world = self.config, self.world
        rows = range(world.rank * config.micro_batch, (world.rank + 1) * config.micro_batch)
        total, parts = torch.zeros((), device=self.device), {}
        for micro in range(config.grad_accum):
            batch = self.source.train_batch(self.step, micro, rows, tasks)
            last = micro == config.grad_accum - 1
            sync = self.model.no_sync() if hasattr(self.model, "no_sync") and not last else None
            with sync or contextlib.nullcontext():
                inputs = None if batch.inputs is None else batch.inputs.to(self.device)
                loss, extra = self._loss(batch.ids.to(self.device), inputs)
                (loss / config.grad_accum).backward()
            total += loss.detach() / config.grad_accum
            for key, value in extra.items():
                parts[key] = parts.get(key, 0.0) + value / config.grad_accum
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
        loss = all_reduce_mean(total, world).item()
        if not math.isfinite(loss) or not math.isfinite(float(grad_norm)):
            raise DelvmError(
                f"non-finite loss ({loss}) or gradient norm at step {self.step}; stopped without "
                f"updating. The last good checkpoint in {self.out / 'checkpoints'} is kept: lower "
                "optim.lr or check the data"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": float(grad_norm), **parts}

    # ---- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Per-task validation loss / accuracy / perplexity (sentence and target scopes)."""
        self.model.eval()
        metrics = TaskMetrics(self.source.image_tokens)
        for ids, tasks, _ in self.source.val_batches(self.config.micro_batch):
            ids = ids.to(self.device)
            with self.autocast:
                logits = self.model(ids[:, :-1])
            metrics.add(tasks, logits, ids[:, 1:])
        self.model.train()
        return metrics.result()

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> Path:
        config, world = self.config, self.world
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume()
        logger = RunLogger(self.out, world.is_main, config.tensorboard)
        bounds = [(first, steps) for first, steps, _ in self.plan]
        lr_at = lr_schedule(config, self.plan)
        flops = 6 * sum(p.numel() for p in self.bare.parameters() if p.requires_grad)
        if world.is_main:
            print(
                f"tokens per optimizer step: {self.tokens_per_step:,} = {config.micro_batch} "
                f"micro-batch x {config.grad_accum} accumulation x {world.size} ranks x "
                f"{config.data.seq_len} tokens"
            )
        bar = tqdm(total=config.steps, initial=self.step, disable=not world.is_main, desc="train")
        with StopSignals() as stop, bar, contextlib.closing(logger):
            self.model.train()
            while self.step < config.steps:
                stage = next(i for i, (f, n, _) in enumerate(self.plan) if self.step < f + n)
                lr = lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                start = time.perf_counter()
                record = self.train_step(self.plan[stage][2])
                seconds = time.perf_counter() - start
                self.step += 1
                record.update(step=self.step, lr=lr, stage=stage,
                              tokens_per_s=self.tokens_per_step / seconds)  # fmt: skip
                if config.peak_tflops > 0:
                    achieved = flops * self.tokens_per_step / seconds / world.size
                    record["mfu"] = achieved / (config.peak_tflops * 1e12)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                if self.step % config.log_every == 0 or self.step == config.steps:
                    logger.log(record)
                    self.history.append({k: record[k] for k in ("step", "loss", "lr")})
                stage_end = self.step == sum(bounds[stage])
                if self.step % config.eval_every == 0 or stage_end:
                    result = self.evaluate()
                    logger.log({"step": self.step, "val": result})
                    if stage_end and len(self.plan) > 1:
                        self.stage_results.append(
                            {"stage": stage, "step": self.step, "val": result}
                        )
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save()
                if stop.received is not None:
                    self.save()
                    break
        if stop.received is not None and world.is_main:
            print(f"stopped by signal {stop.received} at step {self.step}; checkpoint saved")
        if world.is_main and len(self.plan) > 1 and self.step == config.steps:
            (self.out / "stages.json").write_text(json.dumps(self.stage_results, indent=2))
            (self.out / "stages.md").write_text(stage_matrix(self.stage_results, self.plan))
        return self.out


def stage_matrix(results: list[dict], plan: list[tuple[int, int, list[str]]]) -> str:
    """Paper Table 11: validation loss (whole sentence) of every task after every stage."""
    tasks = sorted(results[0]["val"]) if results else []
    lines = [
        "| after stage (trained on) | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for result in results:
        trained = ", ".join(plan[result["stage"]][2])
        losses = [f"{result['val'][t]['sentence']['loss']:.4f}" for t in tasks]
        lines.append(f"| {result['stage'] + 1} ({trained}) | " + " | ".join(losses) + " |")
    return "\n".join(lines) + "\n"


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if kwargs.get("cache") is not None or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


class RunLogger:
    """JSONL always (``OUT/log.jsonl``); TensorBoard scalars (``OUT/tensorboard``) if enabled."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.file = (out / "log.jsonl").open("a") if enabled else None
        self.tb = _summary_writer(out / "tensorboard") if enabled and tensorboard else None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in _flatten(record).items():
                if key != "step":
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _summary_writer(folder: Path):  # -> torch.utils.tensorboard.SummaryWriter | None
    """TensorBoard's writer, or None with a warning where the optional tensorboard package is
    missing: log.jsonl holds the same scalars, so the run goes on without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        warnings.warn(
            f"tensorboard = true, but TensorBoard cannot be imported ({err}): scalars go to "
            "log.jsonl only; pip install 'delvm[tensorboard]' or set tensorboard = false",
            stacklevel=2,
        )
        return None
    return SummaryWriter(str(folder))


def _flatten(record: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, int | float):
            flat[name] = value
    return flat
