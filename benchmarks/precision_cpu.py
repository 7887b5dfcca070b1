"""fp32 against bf16 autocast for the demo's two training steps on this CPU, side by side.

    python benchmarks/precision_cpu.py [--repeats 10]

The tokenizer step (cpu-64-f8-1024, batch 16 of 32 px crops) and the LVM step (2 layers x 192,
8 x 256 tokens), each through its real trainer, alternating fp32 and bf16 so machine noise hits
both alike. Without bf16 matmul units (AMX, AVX512-BF16) bf16 is emulated and slower than fp32.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import best_seconds
from train_throughput import RandomSentences

from delvm.devices import native_bf16_units
from delvm.tokenizer.train import TokenizerTrainer, recipe
from delvm.train.config import load_config
from delvm.train.distributed import World
from delvm.train.trainer import Trainer

WORLD = World(rank=0, size=1, device=torch.device("cpu"))


def tokenizer_step(folder: Path, precision: str):
    config = recipe("cpu-64-f8-1024", data=str(folder), out=str(folder / f"run-{precision}"),
                    batch_size=16, crop=32, val_images=1, precision=precision)  # fmt: skip
    trainer = TokenizerTrainer(config, WORLD)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    return lambda: trainer.train_step(x)


def lvm_step(folder: Path, precision: str):
    overrides = {"hidden_size": 192, "intermediate_size": 512, "num_heads": 6, "num_layers": 2,
                 "max_seq_len": 256, "vocab_size": 1032, "codebook_dim": 64}  # fmt: skip
    config = load_config(None, [
        f"out={str(folder / f'lvm-{precision}')!r}", "model.preset='tiny'",
        f"model.overrides={overrides!r}", "micro_batch=8", "data.seq_len=256",
        "tensorboard=false", f"precision={precision!r}",
    ])  # fmt: skip
    source = RandomSentences(1032, 256, image_tokens=64)
    trainer = Trainer(config, source, WORLD)
    return lambda: trainer.train_step(source.tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(4):  # the tokenizer trainer wants a folder of images to hold one out
            pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
        for name, make in (("tokenizer step", tokenizer_step), ("LVM step", lvm_step)):
            steps = {p: make(folder, p) for p in ("fp32", "bf16")}
            best = {p: float("inf") for p in steps}
            for _ in range(args.repeats):
                for p, step in steps.items():
                    best[p] = min(best[p], best_seconds(step, 1, WORLD.device))
            rows.append((name, best["fp32"], best["bf16"]))
    units = ", ".join(native_bf16_units()) or "none"
    print(f"CPU, {torch.get_num_threads()} threads, bf16 matmul units: {units}")
    print(f"{'step':<16} | {'fp32 ms':>8} | {'bf16 ms':>8} | bf16 speed-up")
    for name, fp32, bf16 in rows:
        print(f"{name:<16} | {fp32 * 1e3:>8.1f} | {bf16 * 1e3:>8.1f} | {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
