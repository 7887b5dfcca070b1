"""Train the CPU tokenizer preset from scratch and report held-out PSNR, codebook usage, time.

    python benchmarks/tokenizer_train_cpu.py [--images 4000] [--steps 1500] [--data FOLDER]

Without --data it writes ``--images`` procedural 64 px scenes (gradients, flat and striped
shapes, soft noise) to a temporary folder; point --data at real images (or the toy world's) to
train on those instead. Extra arguments after ``--`` go to `delvm tokenizer train`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from delvm.cli import main as delvm


def scene(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One procedural scene, drawn at 2x and downsampled (anti-aliased edges)."""
    big = size * 2
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:big, 0:big] / big
    t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2, 0, 1)[..., None]
    image = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 5)):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.integers(0, big - 16, 2)
        w, h = rng.integers(12, big // 2, 2)
        box = [int(x0), int(y0), int(min(big - 1, x0 + w)), int(min(big - 1, y0 + h))]
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.rectangle(box, fill=color)
        elif kind == 1:
            draw.ellipse(box, fill=color)
        elif kind == 2:
            draw.polygon(
                [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color
            )
        else:  # stripes
            step = int(rng.integers(4, 10))
            for x in range(box[0], box[2], step * 2):
                draw.rectangle([x, box[1], min(box[2], x + step - 1), box[3]], fill=color)
    pixels = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    pixels += rng.normal(0, 2.0, pixels.shape)  # a little sensor-like noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_scenes(folder: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene(rng).save(folder / f"{i:05d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="train on this folder instead")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, help="run folder (default: a temporary one)")
    parser.add_argument("extra", nargs="*", help="more `delvm tokenizer train` flags")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_scenes(Path(tmp) / "scenes", args.images)
        out = args.out or Path(tmp) / "run"
        start = time.perf_counter()
        code = delvm(
            [
                "tokenizer",
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                "--preset",
                "cpu-64-f8-1024",
                "--steps",
                str(args.steps),
                *args.extra,
            ]
        )
        wall = time.perf_counter() - start
        if code:
            raise SystemExit(code)
        report = json.loads((out / "report.json").read_text())
    final = report["final"]
    print(
        "\n| data | steps | images seen | train time (s) | wall incl. eval (s) | held-out PSNR "
        "(dB) | codes used | perplexity |"
    )
    print("|---|---|---|---|---|---|---|---|")
    name = str(args.data) if args.data else f"{args.images} procedural 64 px scenes"
    print(
        f"| {name} | {report['steps']} | {report['images_seen']} | {report['train_seconds']:.0f} "
        f"| {wall:.0f} | {final['psnr']:.2f} | {final['used_codes']} | {final['perplexity']:.0f} |"
    )


if __name__ == "__main__":
    main()
