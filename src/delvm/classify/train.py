"""Fine-tuning the classifier: MAE's recipe on the LVM trunk, with the LVM trainer's checkpoints.

The recipe (MAE / BEiT fine-tuning, what the paper's Section 6 used): AdamW with layer-wise lr
decay (trunk block i of L gets lr x decay^(L - i), the patch embedding decay^(L + 1), the final
norm and the head the full lr), weight decay on matrices only, linear warmup then cosine, label
smoothing, drop path; per image RandomResizedCrop + flip, RandAugment and random erasing; per
step mixup or CutMix (timm's Mixup: one of the two per mixing step). The augmentations are
kornia's except mixup: kornia's RandomMixUpV2 draws its weight uniformly, which cannot give
MAE's Beta(0.8, 0.8), and the mix is one line here. The lr is absolute (MAE states a base lr
per 256 images: multiply it by batch / 256 yourself).

Checkpoints are the trainer's (`delvm.train.state`): ``OUT/checkpoints/step-N/`` holds a
classifier folder (`delvm.classify.model`) and the training state; a run started again with the
same ``out`` resumes where the last checkpoint left it, as if never stopped. Under ``torchrun``
the global batch is split across ranks (DDP).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from delvm.classify.data import (
    ImageFolder,
    LabelledImages,
    PixelAugment,
    StepBatches,
    TrainSamples,
    to_pixels,
)
from delvm.classify.evaluate import evaluate
from delvm.classify.model import (
    ClassifierConfig,
    VisualClassifier,
    classifier_from_checkpoint,
    save_classifier,
)
from delvm.classify.toyset import ToySection, ToyWorldKinds
from delvm.data.augment import AugmentConfig
from delvm.errors import DelvmError
from delvm.model.transformer import VisualLM, preset
from delvm.train.config import ModelSection, OptimSection
from delvm.train.distributed import World, all_reduce_mean, barrier, init_world, wrap_model
from delvm.train.optim import cosine_lr
from delvm.train.precision import PRECISIONS, training_autocast
from delvm.train.state import (
    StopSignals,
    checkpoint_dirs,
    read_training_state,
    restore_training_state,
    save_training_checkpoint,
)
from delvm.train.trainer import RunLogger


@dataclass
class ClassifyDataSection:
    train: str = (
        ""  # image folder, one sub-folder per class; empty: the toy set (delvm.classify.toyset)
    )
    val: str = ""  # the same classes; empty: the toy set's val split (none for a folder)
    toy: ToySection = field(default_factory=ToySection)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    eval_crop: float = 0.875  # evaluation: centre crop of this share of the shorter side


@dataclass
class RecipeSection:
    """Regularisation of the fine-tune; every default is off or neutral (MAE's ViT-B values in
    the comments, as configs/classify_imagenet.toml sets them)."""

    layer_decay: float = 0.75  # MAE: 0.65 (ViT-B), 0.75 (ViT-L)
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing weight; 0 turns mixup off (MAE: 0.8)
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) share of the kept image; 0: off (MAE: 1.0)
    mixup_prob: float = 1.0  # share of steps that mix (mixup or CutMix)
    cutmix_switch: float = 0.5  # with both on: share of mixing steps that use CutMix (timm's)
    randaug_ops: int = 0  # RandAugment operations per image; 0: off (MAE: 2)
    randaug_magnitude: int = 9  # on timm's 0..10 scale, 1..9 (MAE: 9)
    erase_prob: float = 0.0  # random erasing, per image (MAE: 0.25)
    drop_path: float = 0.0  # stochastic depth of the last block, 0 at the first (MAE: 0.1)

    def __post_init__(self) -> None:
        if not 0 < self.layer_decay <= 1:
            raise DelvmError(f"recipe.layer_decay {self.layer_decay}: in (0, 1] (1: no decay)")
        if not 0 <= self.label_smoothing < 1:
            raise DelvmError(f"recipe.label_smoothing {self.label_smoothing}: in [0, 1)")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise DelvmError("recipe.mixup_alpha and recipe.cutmix_alpha must be >= 0 (0: off)")
        for name in ("mixup_prob", "cutmix_switch", "erase_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise DelvmError(f"recipe.{name} {getattr(self, name)}: a probability in [0, 1]")
        if self.randaug_ops < 0 or not 1 <= self.randaug_magnitude <= 9:
            raise DelvmError(
                "recipe.randaug_ops must be >= 0 (0: off) and recipe.randaug_magnitude in 1..9 "
                "(timm's scale; kornia's m = 3x, below its 30)"
            )
        if not 0 <= self.drop_path < 1:
            raise DelvmError(f"recipe.drop_path {self.drop_path}: in [0, 1)")


@dataclass
class FinetuneOptimSection(OptimSection):
    """The LVM's optimizer settings with MAE fine-tuning's defaults: betas (0.9, 0.999), weight
    decay 0.05, no gradient clipping (inf: the norm is still measured and logged)."""

    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_ratio: float = 0.05
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = math.inf


@dataclass
class ClassifyConfig:
    out: str = "runs/classify"
    init_from: str = ""  # LVM checkpoint (delvm or HF folder) for the trunk; empty: from scratch
    steps: int = 1000
    batch: int = 64  # images per optimizer step, over all ranks
    seed: int = 0
    workers: int = 2  # image-loading processes per rank
    precision: str = "auto"  # auto (bf16 where bf16 matmuls are native, else fp32) | fp32 | bf16
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 500
    log_every: int = 10
    tensorboard: bool = True
    model: ModelSection = field(default_factory=ModelSection)  # the trunk's shape from scratch
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: ClassifyDataSection = field(default_factory=ClassifyDataSection)
    optim: FinetuneOptimSection = field(default_factory=FinetuneOptimSection)
    recipe: RecipeSection = field(default_factory=RecipeSection)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise DelvmError(f"config precision = {self.precision!r}: use auto, fp32 or bf16")
        if self.batch < 1 or self.steps < 1:
            raise DelvmError("config batch and steps must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


def open_data(data: ClassifyDataSection) -> tuple[LabelledImages, LabelledImages | None]:
    """The training set and the validation set (None: no validation)."""
    if not data.train:
        return ToyWorldKinds(data.toy, "train"), ToyWorldKinds(data.toy, "val")
    train = ImageFolder(data.train)
    val = ImageFolder(data.val) if data.val else None
    if val is not None and val.classes != train.classes:
        raise DelvmError(
            f"{data.val}: its class folders {val.classes[:5]}... differ from {data.train}'s "
            f"{train.classes[:5]}...; both need the same class sub-folders"
        )
    return train, val


def layer_of(name: str, num_layers: int) -> int:
    """A parameter's depth for lr decay: 0 patch embedding, i + 1 block i, L + 1 norm and head."""
    if name.startswith("patch_embed."):
        return 0
    if name.startswith("trunk.blocks."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def param_groups(model: VisualClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with an ``lr_scale`` per depth; weight decay on matrices (and the conv) only."""
    layers = model.trunk.config.num_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth, decay = layer_of(name, layers), param.dim() >= 2
        group = groups.setdefault((depth, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (layers + 1 - depth),
        })  # fmt: skip
        group["params"].append(param)
    return list(groups.values())


def soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot rows with label smoothing: 1 - s + s / C on the label, s / C elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1 - smoothing + off)


def mixup(pixels: Tensor, targets: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Mix each image and target with the batch's reverse, weight ``lam`` (timm's batch mode)."""
    return lam * pixels + (1 - lam) * pixels.flip(0), lam * targets + (1 - lam) * targets.flip(0)


def cutmix(pixels: Tensor, labels: Tensor, targets: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """kornia's CutMix: a box of another image of the batch pasted into each image; the targets
    mix in proportion to the areas (the kept share drawn from Beta(alpha, alpha))."""
    from kornia.augmentation import RandomCutMixV2

    mix = RandomCutMixV2(beta=alpha, use_correct_lambda=True, data_keys=["input", "class"])
    params = mix.forward_parameters(pixels.shape)  # drawn here to know who pastes into whom
    pixels, (mixed,) = mix(pixels, labels, params=params)
    pasted = params["mix_pairs"][0].to(targets.device)  # row i receives a box of row pasted[i]
    kept = mixed[:, 2:3].to(targets.dtype)  # kornia's rows: label, pasted label, share kept
    return pixels, kept * targets + (1 - kept) * targets[pasted]


def mix_batch(
    pixels: Tensor, labels: Tensor, targets: Tensor, recipe: RecipeSection, seed: list[int]
) -> tuple[Tensor, Tensor]:
    """Mixup or CutMix (or neither) for one step, as timm's Mixup chooses; every draw is a
    function of ``seed``."""
    rng = np.random.default_rng(seed)
    on = [kind for kind in ("mixup", "cutmix") if getattr(recipe, f"{kind}_alpha") > 0]
    if not on or rng.random() >= recipe.mixup_prob:
        return pixels, targets
    if len(on) == 2:
        on = ["cutmix"] if rng.random() < recipe.cutmix_switch else ["mixup"]
    if on == ["mixup"]:
        return mixup(pixels, targets, float(rng.beta(recipe.mixup_alpha, recipe.mixup_alpha)))
    with torch.random.fork_rng(devices=[]):  # kornia draws from torch's global generator
        torch.manual_seed(int(rng.integers(2**63)))
        return cutmix(pixels, labels, targets, recipe.cutmix_alpha)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ClassifierTrainer:
    def __init__(self, config: ClassifyConfig, world: World | None = None):
        self.config = config
        self.world = world or init_world()
        self.device = self.world.device
        self.out = Path(config.out)
        if config.batch % self.world.size:
            raise DelvmError(
                f"config batch {config.batch} does not split over {self.world.size} ranks; "
                "use a multiple of the number of processes"
            )
        self.train_set, self.val_set = open_data(config.data)
        self.classes = list(self.train_set.classes)
        self.classifier_config = replace(config.classifier, num_classes=len(self.classes))
        torch.manual_seed(config.seed)
        if config.init_from:
            bare = classifier_from_checkpoint(config.init_from, self.classifier_config, self.device)
        else:
            trunk_config = preset(config.model.preset, **config.model.overrides)
            with torch.device(self.device):
                bare = VisualClassifier(VisualLM(trunk_config), self.classifier_config)
        bare.set_drop_path(config.recipe.drop_path)
        self.bare = bare
        self.model = wrap_model(bare, self.world, "ddp")
        o = config.optim
        groups = param_groups(bare, o.weight_decay, config.recipe.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
        self.autocast = training_autocast(config.precision, self.device)
        self.augment = AugmentConfig(
            size=self.classifier_config.image_size, scale=tuple(config.data.crop_scale),
            ratio=tuple(config.data.crop_ratio), hflip=config.data.hflip,
        )  # fmt: skip
        r = config.recipe
        self.pixel_augment = PixelAugment(r.randaug_ops, r.randaug_magnitude, r.erase_prob)
        self.step = 0
        self.history: list[dict] = []

    # ---- checkpoints -------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the latest checkpoint in ``out`` if there is one."""
        found = checkpoint_dirs(self.out)
        if not found:
            return
        latest = found[-1]
        state = read_training_state(latest)
        saved, mine = state["config"], self.config.to_dict()
        for key in ("model", "init_from", "classifier", "data", "batch", "seed"):
            if json.dumps(saved.get(key), sort_keys=True) != json.dumps(mine[key], sort_keys=True):
                raise DelvmError(
                    f"{latest}: checkpoint was written with a different {key!r} setting; resume "
                    "with the same config or choose a new `out` folder"
                )
        if state.get("world_size") != self.world.size:
            raise DelvmError(
                f"{latest}: written by {state.get('world_size')} ranks, resumed by "
                f"{self.world.size}; resume with the same number of processes"
            )
        restore_training_state(latest, state, self.model, self.optimizer)
        self.step, self.history = state["step"], state.get("history", [])
        if self.world.is_main:
            print(f"resumed from {latest} at step {self.step}")

    def save(self) -> None:
        extra = {"config": self.config.to_dict(), "world_size": self.world.size,
                 "history": self.history}  # fmt: skip
        trunk, data = self.bare.trunk.config, asdict(self.config.data)

        def write(state: dict[str, Tensor], folder: Path) -> None:
            save_classifier(state, folder, trunk, self.classifier_config, self.classes, data)

        save_training_checkpoint(
            self.out, self.step, self.model, self.optimizer, extra, self.world.is_main,
            self.config.keep_checkpoints, write,
        )  # fmt: skip
        barrier(self.world)

    # ---- one optimizer step ------------------------------------------------------------------

    def train_step(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        config = self.config
        pixels, labels = to_pixels(images, self.device), labels.to(self.device)
        targets = soft_targets(labels, len(self.classes), config.recipe.label_smoothing)
        # One mixing draw per step, the same on every rank (a function of the step alone).
        pixels, targets = mix_batch(
            pixels, labels, targets, config.recipe, [config.seed, self.step, 2]
        )
        with self.autocast:
            logits = self.model(pixels)
        loss = soft_cross_entropy(logits, targets)
        loss.backward()
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
        )
        value = all_reduce_mean(loss.detach(), self.world).item()
        if not math.isfinite(value) or not math.isfinite(grad_norm):
            raise DelvmError(
                f"non-finite loss ({value}) or gradient norm at step {self.step}; stopped without "
                f"updating. The last good checkpoint in {self.out / 'checkpoints'} is kept: lower "
                "optim.lr"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": value, "grad_norm": grad_norm}

    def evaluate(self) -> dict:
        return evaluate(self.bare, self.val_set, self.config.data.eval_crop, self.config.batch,
                        self.config.workers, self.world, self.autocast)  # fmt: skip

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> dict | None:
        """Train to ``steps``; returns the last validation result (None without a val set)."""
        config, world = self.config, self.world
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume()
        logger = RunLogger(self.out, world.is_main, config.tensorboard)
        per_rank = config.batch // world.size
        rows = range(world.rank * per_rank, (world.rank + 1) * per_rank)
        loader = DataLoader(
            TrainSamples(self.train_set, self.augment, config.seed, self.pixel_augment),
            batch_sampler=StepBatches(self.step, config.steps, config.batch, rows),
            num_workers=config.workers,
            # Its own generator: the loader's seed draw must not move the global stream drop
            # path draws from, or a resumed run would drop other paths than an uninterrupted one.
            generator=torch.Generator().manual_seed(config.seed),
        )
        if world.is_main:
            print(f"{len(self.train_set):,} training images, {len(self.classes)} classes, "
                  f"{sum(p.numel() for p in self.bare.parameters()):,} parameters")  # fmt: skip
        bar = tqdm(total=config.steps, initial=self.step, disable=not world.is_main, desc="train")
        result = None
        with StopSignals() as stop, bar, contextlib.closing(logger):
            self.model.train()
            for images, labels in loader:
                lr = cosine_lr(self.step, config.steps, config.optim)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                record = self.train_step(images, labels)
                self.step += 1
                record.update(step=self.step, lr=lr)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                if self.step % config.log_every == 0 or self.step == config.steps:
                    logger.log(record)
                    self.history.append({k: record[k] for k in ("step", "loss", "lr")})
                last = self.step == config.steps
                if self.val_set is not None and (self.step % config.eval_every == 0 or last):
                    result = self.evaluate()
                    logger.log({"step": self.step, "val": result})
                if self.step % config.checkpoint_every == 0 or last:
                    self.save()
                if stop.received is not None:
                    self.save()
                    break
        if stop.received is not None and world.is_main:
            print(f"stopped by signal {stop.received} at step {self.step}; checkpoint saved")
        if world.is_main and result is not None:
            print(format_result(result))
        return result


def format_result(result: dict) -> str:
    return (
        f"top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  loss {result['loss']:.4f}  "
        f"({result['images']:,} images, {result['skipped']} unreadable skipped)"
    )
