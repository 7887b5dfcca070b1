"""`delvm tokenizer train`: a VQGAN from scratch on a folder of images.

Each step: reconstruction loss (L1 and/or L2) + VQ codebook/commitment loss, plus LPIPS when
local VGG16 weights are given, plus a PatchGAN hinge loss with the adaptive weight from
``gan_start`` on (then one discriminator step). Codes that received no assignment over the last
``restart_every`` steps are re-seeded from this batch's encoder outputs; the first step re-seeds
them all (a data-dependent initialisation), so usage does not collapse.

``OUT`` holds ``checkpoints/step-000500/`` (config.json + model.safetensors: a loadable tokenizer;
discriminator.safetensors; training_state.pt with optimizers, RNG, step, code counts),
``tokenizer/`` (the final weights), ``log.jsonl`` and ``report.json``. Checkpoints are written
under a temporary name and renamed; a run started again on the same ``OUT`` resumes exactly
where the last checkpoint left it. Under torchrun, each rank trains on its slice of every batch
(DDP).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from delvm.data.images import list_images
from delvm.errors import DelvmError
from delvm.tokenizer.folders import SquareImages
from delvm.tokenizer.losses import LPIPS, PatchDiscriminator, adaptive_gan_weight, hinge_d_loss
from delvm.tokenizer.presets import preset
from delvm.tokenizer.quality import codebook_usage, psnr
from delvm.tokenizer.vqgan import VQGAN, read_state
from delvm.train.distributed import World, barrier, init_world
from delvm.train.precision import PRECISIONS, training_autocast
from delvm.train.state import (
    StopSignals,
    checkpoint_dirs,
    read_training_state,
    rng_state,
    set_rng_state,
)

STATE_NAME = "training_state.pt"
DISC_NAME = "discriminator.safetensors"
# Settings that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = {
    "out",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "workers",
}


@dataclass
class TokenizerTrainConfig:
    data: str = ""  # folder of training images (any size; shorter side resized, centre-cropped)
    out: str = "runs/tokenizer"
    preset: str = "cpu-64-f8-1024"  # tokenizer shape (delvm.tokenizer.PRESETS)
    model: dict = field(default_factory=dict)  # VQGANConfig fields overriding the preset
    steps: int = 3000
    batch_size: int = 32  # images per rank per step
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay floor
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: off
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    codebook_weight: float = 1.0
    restart_every: int = 50  # re-seed codes unused for this many steps; 0: never
    perceptual_weights: list[str] = field(default_factory=list)  # local VGG16 (+ LPIPS) files
    perceptual_weight: float = 1.0
    gan_weight: float = 0.0  # 0: no discriminator
    gan_start: int = 0  # step the discriminator and the GAN loss switch on
    disc_lr: float = 0.0  # 0: same as lr
    disc_width: int = 64
    disc_layers: int = 3
    hflip: bool = True  # random horizontal flips
    # Train on random crops of this side (a multiple of the downsampling factor; 0: whole
    # images). The networks are convolutional, so crops train the same weights at a fraction of
    # the cost per image: half-side crops give 4x the steps in the same time.
    crop: int = 0
    val_images: int = 256  # held out (chosen by a hash of the file name), never trained on
    # Draw every top-level subfolder of `data` equally often (a long-tailed folder, such as the
    # toy world's tasks at 10:1:1, otherwise gives its rare kinds few reconstructions to learn).
    balance_folders: bool = False
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    workers: int = 0  # image-decoding processes
    precision: str = "auto"  # auto (bf16 where bf16 matmuls are native, else fp32) | fp32 | bf16

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.perceptual_weights = list(self.perceptual_weights)
        if self.precision not in PRECISIONS:
            raise DelvmError(f"precision {self.precision!r}: choose auto, fp32 or bf16")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise DelvmError(f"tokenizer training: {name} must be at least 1")
        if self.l1_weight <= 0 and self.l2_weight <= 0:
            raise DelvmError("tokenizer training: set l1_weight or l2_weight above 0")

    def to_dict(self) -> dict:
        return asdict(self)


# Per preset, the training settings it is meant to be trained with.
RECIPES: dict[str, TokenizerTrainConfig] = {
    "cpu-64-f8-1024": TokenizerTrainConfig(preset="cpu-64-f8-1024"),
    # The paper's tokenizer shape, trained as taming-transformers trains it (batch 8 per GPU).
    "f16-8192": TokenizerTrainConfig(
        preset="f16-8192",
        steps=400_000,
        batch_size=8,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=1000,
        restart_every=1000,
        gan_weight=0.8,
        gan_start=50_000,
        eval_every=5000,
        checkpoint_every=5000,
        val_images=1000,
        precision="auto",
    ),
}


def recipe(name: str, **overrides) -> TokenizerTrainConfig:
    if name not in RECIPES:
        raise DelvmError(f"unknown tokenizer preset {name!r}; choose one of {sorted(RECIPES)}")
    return replace(RECIPES[name], **overrides)


def lr_at(step: int, config: TokenizerTrainConfig) -> float:
    """Linear warmup, then cosine from lr down to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


# ---- data --------------------------------------------------------------------------------------


def split_held_out(files: list[Path], root: Path, count: int) -> tuple[list[Path], list[Path]]:
    """(train, held-out): the held-out files are those whose relative name hashes lowest, so the
    split does not move when files are added or removed elsewhere."""
    rank = sorted(
        files, key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).digest()
    )
    held = set(rank[:count])
    return [p for p in files if p not in held], [p for p in files if p in held]


def balance_by_folder(files: list[Path], root: Path) -> list[Path]:
    """Each top-level subfolder's files repeated in turn up to the largest one's count, so an
    epoch draws every folder equally often; files directly in ``root`` are one more group."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        parts = path.relative_to(root).parts
        groups[parts[0] if len(parts) > 1 else ""].append(path)
    largest = max((len(group) for group in groups.values()), default=0)
    return [group[i % len(group)] for group in groups.values() for i in range(largest)]


class BatchPlan:
    """Which files each step reads: epoch-wise seeded permutations, a pure function of the step,
    so resuming at step s reads exactly what the uninterrupted run would have."""

    def __init__(self, n: int, batch: int, world: World, seed: int, start: int, stop: int):
        self.n, self.batch, self.world, self.seed = n, batch, world, seed
        self.start, self.stop = start, stop
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=_generator(self.seed, epoch))}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        first = (step * self.world.size + self.world.rank) * self.batch
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + self.batch)]

    def __iter__(self):
        return (self.indices(step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _generator(*seeds: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(seeds) & 0x7FFF_FFFF_FFFF_FFFF)


# ---- the trainer -------------------------------------------------------------------------------


class TokenizerTrainer:
    def __init__(self, config: TokenizerTrainConfig, world: World | None = None):
        self.config = config
        self.world = world or init_world()
        self.device = self.world.device
        self.out = Path(config.out)
        torch.manual_seed(config.seed)

        self.model = VQGAN(preset(config.preset, **config.model)).to(self.device)
        self.ddp = self._wrap(self.model)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
        )
        self.lpips = None
        if config.perceptual_weights and config.perceptual_weight > 0:
            self.lpips = LPIPS.from_files(config.perceptual_weights).to(self.device)
        self.disc = self.disc_ddp = self.disc_optimizer = None
        if config.gan_weight > 0:
            self.disc = PatchDiscriminator(
                self.model.config.num_channels, config.disc_width, config.disc_layers
            ).to(self.device)
            self.disc_ddp = self._wrap(self.disc)
            self.disc_optimizer = torch.optim.AdamW(
                self.disc.parameters(),
                lr=config.disc_lr or config.lr,
                betas=config.betas,
                weight_decay=config.weight_decay,
            )
        self.autocast = training_autocast(config.precision, self.device)

        self.size = self.model.config.resolution
        factor = self.model.config.downsample_factor
        if config.crop and (config.crop % factor or not factor <= config.crop <= self.size):
            raise DelvmError(
                f"tokenizer training: crop {config.crop} must be a multiple of {factor} "
                f"(the downsampling factor) between {factor} and {self.size}, or 0 for none"
            )
        root = Path(config.data)
        files = list_images(root)
        self.train_files, self.val_files = split_held_out(files, root, config.val_images)
        if config.balance_folders:
            self.train_files = balance_by_folder(self.train_files, root)
        if not self.train_files:
            raise DelvmError(
                f"{root}: {len(files)} images leave none to train on after holding out "
                f"val_images={config.val_images}; add images or lower val_images"
            )
        self.counts = torch.zeros(self.model.num_codes, dtype=torch.long, device=self.device)
        self.step = 0
        self.seconds = 0.0  # training wall-clock, summed over resumptions
        self.history: list[dict] = []
        self.skipped: dict[str, str] = {}

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.world.size == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    # ---- checkpoints ---------------------------------------------------------------------------

    def _state(self) -> dict:
        state = {
            "step": self.step,
            "seconds": self.seconds,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "counts": self.counts.cpu(),
            "config": self.config.to_dict(),
            "world_size": self.world.size,
            "history": self.history,
            "skipped": self.skipped,
        }
        if self.disc_optimizer is not None:
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state

    def save(self) -> Path | None:
        """Write ``checkpoints/step-NNNNNN`` (rank 0) via a temporary folder, keep the newest."""
        final = None
        if self.world.is_main:
            root = self.out / "checkpoints"
            final = root / f"step-{self.step:06d}"
            tmp = root / f"step-{self.step:06d}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.model.save_pretrained(tmp)
            if self.disc is not None:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in self.disc.state_dict().items()},
                    str(tmp / DISC_NAME),
                )
            torch.save(self._state(), tmp / STATE_NAME)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            keep = self.config.keep_checkpoints
            for old in checkpoint_dirs(self.out)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.world)
        return final

    def resume(self) -> bool:
        """Continue from the newest checkpoint in ``out``; False when there is none."""
        found = checkpoint_dirs(self.out)
        if not found:
            return False
        latest = found[-1]
        state = read_training_state(latest)
        # A setting added after the checkpoint was written ran at its default there.
        saved = {**TokenizerTrainConfig().to_dict(), **state["config"]}
        mine = self.config.to_dict()
        for key in sorted(set(saved) | set(mine)):
            if key not in RESUMABLE_CHANGES and json.dumps(saved.get(key)) != json.dumps(
                mine.get(key)
            ):
                raise DelvmError(
                    f"{latest}: written with {key}={saved.get(key)!r}, this run has "
                    f"{mine.get(key)!r}; resume with the same settings or choose a new --out"
                )
        if state["world_size"] != self.world.size:
            raise DelvmError(
                f"{latest}: written by {state['world_size']} ranks; resume with as many"
            )
        self.model.load_state_dict(read_state(latest / "model.safetensors"))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.disc is not None:
            self.disc.load_state_dict(read_state(latest / DISC_NAME))
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        set_rng_state(state["rng"])
        self.counts.copy_(state["counts"])
        self.step, self.seconds = state["step"], state["seconds"]
        self.history, self.skipped = state["history"], state["skipped"]
        if self.world.is_main:
            print(f"resumed from {latest} at step {self.step}")
        return True

    # ---- one step ------------------------------------------------------------------------------

    def _batch(self, items: list) -> Tensor:
        """Readable images of a step as float [b, C, S, S], flipped per the step's seeded draw."""
        draw = _generator(self.config.seed, self.step, 1, self.world.rank)
        flips = torch.rand(len(items), generator=draw) < 0.5
        crop = self.config.crop or self.size
        corners = torch.randint(self.size - crop + 1, (len(items), 2), generator=draw)
        images = []
        for (path, array, reason), flip, (top, left) in zip(
            items, flips.tolist(), corners.tolist(), strict=True
        ):
            if array is None:
                if str(path) not in self.skipped and self.world.is_main:
                    tqdm.write(f"skipping {reason}")
                self.skipped[str(path)] = reason
                continue
            array = array[top : top + crop, left : left + crop]
            images.append(array[:, ::-1] if flip and self.config.hflip else array)
        if not images:
            raise DelvmError(f"step {self.step}: no readable image in the batch ({items[0][2]})")
        return self.model.to_pixels(np.stack(images))

    def train_step(self, x: Tensor) -> dict[str, float]:
        config, bare = self.config, self.model
        with self.autocast:
            recon, ids, vq_loss, z = self.ddp(x)
        recon = recon.float()
        rec = config.l1_weight * (x - recon).abs().mean() + config.l2_weight * F.mse_loss(recon, x)
        record = {"rec": rec.item(), "vq": vq_loss.item()}
        if self.lpips is not None:
            with self.autocast:
                perceptual = self.lpips(x, recon).float().mean()
            rec = rec + config.perceptual_weight * perceptual
            record["lpips"] = perceptual.item()
        loss = rec + config.codebook_weight * vq_loss
        gan_on = self.disc is not None and self.step >= config.gan_start
        if gan_on:
            self.disc.requires_grad_(False)  # the generator's step does not train the critic
            with self.autocast:
                g_loss = -self.disc(recon).float().mean()
            weight = config.gan_weight * adaptive_gan_weight(
                rec, g_loss, bare.decoder.conv_out.weight
            )
            loss = loss + weight * g_loss
            record.update(g=g_loss.item(), gan_weight=weight.item())

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            record["grad_norm"] = float(
                nn.utils.clip_grad_norm_(bare.parameters(), config.grad_clip)
            )
        if not math.isfinite(loss.item()):
            raise DelvmError(
                f"non-finite loss at step {self.step}; the last good checkpoint in "
                f"{self.out / 'checkpoints'} is kept: lower --lr or check the data"
            )
        self.optimizer.step()

        if gan_on:
            self.disc.requires_grad_(True)
            with self.autocast:  # real and fake in one pass: one DDP forward per backward
                logits = self.disc_ddp(torch.cat([x, recon.detach()])).float()
            d_loss = hinge_d_loss(*logits.chunk(2))
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_optimizer.step()
            record["d"] = d_loss.item()

        self.counts += torch.bincount(ids.flatten(), minlength=bare.num_codes)
        if config.restart_every and (self.step == 0 or (self.step + 1) % config.restart_every == 0):
            record.update(self._restart_dead_codes(z.detach()))
        record["loss"] = loss.item()
        return record

    @torch.no_grad()
    def _restart_dead_codes(self, z: Tensor) -> dict[str, float]:
        """Codes with no assignment since the last check take random encoder outputs of this
        batch (rank 0's, broadcast so every rank keeps the same codebook)."""
        counts = self.counts.clone()
        if self.world.size > 1:
            dist.all_reduce(counts)
        dead = (counts == 0).nonzero().flatten()
        usage = 1.0 - len(dead) / len(counts)
        self.counts.zero_()
        if len(dead):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            g = _generator(self.config.seed, self.step, 2)
            pick = torch.randint(len(flat), (len(dead),), generator=g).to(flat.device)
            noise = torch.randn(len(dead), flat.shape[1], generator=g).to(flat.device)
            # A little noise: several codes may be seeded from the same vector.
            fresh = flat[pick] + 0.01 * flat.std() * noise
            if self.world.size > 1:
                dist.broadcast(fresh, src=0)
            codebook = self.model.codebook
            codebook[dead] = fresh.to(codebook.dtype)
            for moment in self.optimizer.state.get(codebook, {}).values():
                if torch.is_tensor(moment) and moment.shape == codebook.shape:
                    moment[dead] = 0.0  # stale Adam moments would drag the new code away
        return {"window_usage": usage, "restarted": float(len(dead))}

    # ---- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batch_size: int = 64) -> dict[str, float]:
        """Held-out PSNR (dB, mean over images) and codebook usage on the held-out images."""
        self.model.eval()
        scores, counts = [], torch.zeros(self.model.num_codes, dtype=torch.long)
        dataset = SquareImages(self.val_files, self.size)
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            self.skipped.update({str(p): r for p, a, r in items if a is None})
            arrays = [a for _, a, _ in items if a is not None]
            if not arrays:
                continue
            x = self.model.to_pixels(np.stack(arrays))
            with self.autocast:
                ids = self.model.encode(x)
                recon = self.model.decode(ids)
            scores.append(psnr(x, recon).cpu())
            counts += torch.bincount(ids.flatten().cpu(), minlength=self.model.num_codes)
        self.model.train()
        if not scores:
            return {}
        return {
            "psnr": float(torch.cat(scores).mean()),
            "images": sum(len(s) for s in scores),
            **codebook_usage(counts),
        }

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to ``steps`` (resuming if ``out`` has a checkpoint); returns the final report."""
        config, world = self.config, self.world
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume()
        main = world.is_main
        if main:
            print(
                f"tokenizer {config.preset}: {sum(p.numel() for p in self.model.parameters()):,} "
                f"parameters, {self.model.num_codes} codes, {self.model.grid_size}x"
                f"{self.model.grid_size} tokens per {self.size} px image; "
                f"{len(self.train_files)} training / {len(self.val_files)} held-out images"
                + (" (subfolders balanced: rarer ones repeated)" if config.balance_folders else "")
            )
        plan = BatchPlan(
            len(self.train_files), config.batch_size, world, config.seed, self.step, config.steps
        )
        loader = DataLoader(
            SquareImages(self.train_files, self.size),
            batch_sampler=plan,
            num_workers=config.workers,
            collate_fn=list,
            generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
        )
        log = (self.out / "log.jsonl").open("a") if main else None
        bar = tqdm(total=config.steps, initial=self.step, desc="train tokenizer", disable=not main)
        self.model.train()
        with StopSignals() as stop, bar, log or contextlib.nullcontext():
            for items in loader:
                lr = lr_at(self.step, config)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if self.disc_optimizer is not None:
                    for group in self.disc_optimizer.param_groups:
                        group["lr"] = lr * (config.disc_lr or config.lr) / config.lr
                start = time.perf_counter()
                x = self._batch(items)
                record = self.train_step(x)
                self.seconds += time.perf_counter() - start
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", rec=f"{record['rec']:.4f}")
                if main and (self.step % config.log_every == 0 or self.step == config.steps):
                    record.update(step=self.step, lr=lr, seconds=round(self.seconds, 2))
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    self._evaluate_and_log(log)
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save()
                if stop.received is not None:
                    if self.step % config.checkpoint_every:
                        self.save()
                    if main:
                        print(f"stopped by signal {stop.received} at step {self.step}; saved")
                    return {}
        return self._finish()

    def _evaluate_and_log(self, log) -> None:
        if self.world.is_main and self.val_files:
            result = {"step": self.step, "seconds": round(self.seconds, 2), **self.evaluate()}
            self.history.append(result)
            log.write(json.dumps({"val": result}) + "\n")
            log.flush()
            tqdm.write(
                f"step {self.step}: held-out PSNR {result.get('psnr', float('nan')):.2f} dB, "
                f"codes used {result.get('used_codes', 0)}/{self.model.num_codes}"
            )
        barrier(self.world)

    def _finish(self) -> dict:
        if not self.world.is_main:
            return {}
        self.model.save_pretrained(self.out / "tokenizer")
        report = {
            "steps": self.step,
            "train_seconds": round(self.seconds, 1),
            "images_seen": self.step * self.config.batch_size * self.world.size,
            "final": self.history[-1] if self.history else {},
            "skipped": self.skipped,
            "fingerprint": self.model.fingerprint(),
            "tokenizer": str(self.out / "tokenizer"),
        }
        (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
