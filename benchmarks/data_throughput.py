"""Data throughput: sentences served from a token store vs what training consumes, how fast
`delvm data build` turns sources into examples, and how the build scales with worker processes
and torchrun ranks on real formats at real image sizes.

Serving: `SentenceSampler.train_batch` on stores of the demo's shape (64 px, 8x8 tokens per image,
256-token sentences) and the paper's (256 px, 16x16, 2048 tokens), beside one training step of a
~5M-parameter model at the demo's shape, on this machine, in the same run. The ratio is tokens
served per second over tokens trained per second (target >= 100).

Building: a toy world store (segmentation 20x each tail task, balance "augment") with a VQGAN of
the demo tokenizer's shape; examples/s counts original and augmented examples; "without the
tokenizer" divides by the time outside `VQGAN.encode` (sources, resize/augment, shards, store).

Scaling: `delvm data build` (the command, under torchrun for 2 ranks) on SA-1B-like photos
(1500 x 2250 JPEGs, `--masks` COCO-RLE masks each, rendered as instance maps) and COCO keypoints
(640 x 480 JPEGs, 1-3 persons each, drawn as skeleton maps), tokenized by a random VQGAN of the
demo tokenizer's shape (64 px, cheap: the build is decode-bound, as with a GPU tokenizer), with
0, 1 and 2 worker processes and 1 and 2 ranks. Examples/s divides examples by the build's own
time (rank 0's `Builder.run`: listing, both passes, assembly; not interpreter start or tokenizer
load); ratios are against 1 rank with 0 and 1 workers, beside the ratio 2 processes reach on a
pure-Python loop in the same run (what the machine allows). Peak memory is the largest sum of
memory (PSS) over the build's processes (polled from /proc every 0.1 s; Linux) at 1x and 10x
the examples (10x = the same files hard-linked under new names). The load average is printed
with every row: other work on the machine takes cores from the build.

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --parts serve build   # without the scaling runs
    python benchmarks/data_throughput.py --parts scale --sa1b 16 --coco 96
    python benchmarks/data_throughput.py --parts scale --results bench_out/data   # results page
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from timing import results_file

from delvm.data.sampler import SamplerConfig, SentenceSampler
from delvm.data.store import BuildConfig, Builder, TaskArrays, open_store, write_store
from delvm.model.transformer import VisualLM, preset
from delvm.tokenizer import VQGAN
from delvm.tokenizer import preset as tokenizer_preset


def synthetic_store(folder: Path, grid: int, rows: dict[str, int], num_codes: int = 8192):
    """Random tokens in the layout a build writes (pairs, copy 0 only)."""
    rng = np.random.default_rng(0)
    tasks = {
        name: TaskArrays(
            rng.integers(0, num_codes, (n, 2, grid * grid), dtype=np.uint16),
            np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], 1),
            [f"{name}/{i}" for i in range(n)],
        )
        for name, n in rows.items()
    }
    identity = {"fingerprint": "0" * 16, "num_codes": num_codes, "grid_size": grid, "path": ""}
    return open_store(write_store(folder, tasks, identity, balance="none"))


def sentences_per_second(sampler: SentenceSampler, batch: int, seconds: float) -> float:
    sampler.train_batch(0, 0, range(batch), sampler.tasks)  # warm the page cache
    done, step, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.train_batch(step, 0, range(batch), sampler.tasks)
        done, step = done + batch, step + 1
    return done / (time.perf_counter() - start)


def training_tokens_per_second(seq_len: int, batch: int, steps: int) -> tuple[float, int]:
    """Forward, backward and AdamW of a ~5M-parameter LLaMA at the demo's sentence length."""
    config = preset(
        "tiny", vocab_size=1024, hidden_size=256, intermediate_size=688, num_heads=4,
        num_layers=6, max_seq_len=seq_len, embedding="learned",
    )  # fmt: skip
    model = VisualLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1024, (batch, seq_len))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return batch * seq_len / min(times[1:]), params


def build_rates(args, work: Path) -> dict:
    torch.manual_seed(0)
    tokenizer = VQGAN(tokenizer_preset("cpu-64-f8-1024")).eval()
    tokenizer.save_pretrained(work / "tok")
    world = {"format": "toyworld", "resolution": 64, "segmentation": 0, "pose": 0, "derain": 0}
    sources = [
        {**world, "segmentation": args.segmentation},
        {**world, "pose": args.tail},
        {**world, "derain": args.tail},
    ]
    config = BuildConfig(out=str(work / "store"), tokenizer=str(work / "tok"), sources=sources,
                         shard_size=64, batch_size=64)  # fmt: skip
    report = Builder(config, tokenizer).run()
    examples = sum(t["rows"] for t in report["tasks"].values())
    seconds = report["seconds"]
    return {
        "examples": examples,
        "total": examples / seconds["total"],
        "without": examples / (seconds["total"] - seconds["encode"]),
        "encode": examples / seconds["encode"],
    }


# ---- scaling: workers and ranks on real formats ---------------------------------------------


def photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A photo-like image: smooth colour fields plus grain (compresses like a photo as JPEG)."""
    coarse = rng.integers(0, 256, (height // 50 + 2, width // 50 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.integers(-12, 13, smooth.shape)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def replicate(folder: Path, name: str, copy: int) -> str:
    """Hard-link `name` as a new file name for the copy-th replica (no new decoding work saved)."""
    stem, suffix = name.rsplit(".", 1)
    new = f"{stem}_r{copy}.{suffix}"
    if not (folder / new).exists():
        os.link(folder / name, folder / new)
    return new


def write_sa1b(folder: Path, count: int, masks: int, replicas: int) -> None:
    """SA-1B's layout: sa_N.jpg (1500 x 2250) + sa_N.json with `masks` RLE masks of ellipses from
    ~20 px to ~1000 px across (SA-1B averages ~100 masks per image)."""
    rng = np.random.default_rng(0)
    height, width = 1500, 2250
    folder.mkdir(parents=True)
    for i in range(count):
        photo(rng, height, width).save(folder / f"sa_{i}.jpg", quality=90)
        annotations = []
        for m in range(masks):
            ry, rx = np.exp(rng.uniform(np.log(10), np.log(500), 2))
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            y0, y1 = int(max(0, cy - ry)), int(min(height, cy + ry + 1))
            x0, x1 = int(max(0, cx - rx)), int(min(width, cx + rx + 1))
            y, x = np.ogrid[y0:y1, x0:x1]
            mask = np.zeros((height, width), dtype=np.uint8, order="F")
            mask[y0:y1, x0:x1] = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
            rle = mask_utils.encode(mask)
            rle["counts"] = rle["counts"].decode()  # SA-1B stores the RLE string as text
            annotations.append({"id": m, "segmentation": rle, "area": int(mask.sum())})
        for r in range(replicas):
            name = f"sa_{i}.jpg" if r == 0 else replicate(folder, f"sa_{i}.jpg", r)
            record = {"image": {"image_id": i, "file_name": name, "height": height, "width": width},
                      "annotations": annotations}  # fmt: skip
            (folder / name).with_suffix(".json").write_text(json.dumps(record))


def write_coco(folder: Path, count: int, replicas: int) -> Path:
    """person_keypoints.json + 640 x 480 JPEGs with 1-3 standing persons each."""
    rng = np.random.default_rng(1)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    # A standing person in COCO's joint order, in units of `scale` around the hips.
    layout = np.array([(0, -3.4), (0.25, -3.6), (-0.25, -3.6), (0.5, -3.45), (-0.5, -3.45),
                       (0.9, -2.4), (-0.9, -2.4), (1.2, -1.2), (-1.2, -1.2), (1.3, 0),
                       (-1.3, 0), (0.6, 0), (-0.6, 0), (0.6, 1.8), (-0.6, 1.8), (0.6, 3.6),
                       (-0.6, 3.6)])  # fmt: skip
    images, annotations = [], []
    for i in range(count):
        name = f"{i:012d}.jpg"
        photo(rng, 480, 640).save(images_dir / name, quality=90)
        persons = []
        for _ in range(rng.integers(1, 4)):
            scale = rng.uniform(10, 40)
            x0, y0 = (
                rng.uniform(2 * scale, 640 - 2 * scale),
                rng.uniform(4 * scale, 480 - 4 * scale),
            )
            points = np.concatenate([layout * scale + (x0, y0), np.full((17, 1), 2)], axis=1)
            persons.append(points.reshape(-1).round(1).tolist())
        for r in range(replicas):
            image_id = r * count + i
            file_name = name if r == 0 else replicate(images_dir, name, r)
            images.append({"id": image_id, "file_name": file_name, "height": 480, "width": 640})
            for keypoints in persons:
                annotations.append({"id": len(annotations), "image_id": image_id,
                                    "category_id": 1, "keypoints": keypoints})  # fmt: skip
    categories = [{"id": 1, "name": "person", "keypoints": [f"k{j}" for j in range(17)]}]
    path = folder / "person_keypoints.json"
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))
    return path


def tree_memory(pid: int) -> int:
    """Bytes of memory of `pid` and all its descendants: the sum of their proportional set sizes
    (PSS, from /proc: a page shared by n processes counts 1/n to each, so forked workers' shared
    pages are not counted twice)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    family, frontier = {pid}, [pid]
    while frontier:
        children = [c for c, parent in parents.items() if parent in frontier]
        family.update(children)
        frontier = children
    total = 0
    for member in family:
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def run_build(config: Path, out: Path, ranks: int, workers: int, memory: bool = False) -> dict:
    """One `delvm data build`: examples, the build's own seconds (and the tokenizer's share), and
    with `memory` its peak memory (polling /proc costs CPU, so throughput rows do not)."""
    command = [sys.executable, "-m", "delvm.cli", "data", "build", str(config), "--out", str(out),
               "--device", "cpu", "--workers", str(workers)]  # fmt: skip
    if ranks > 1:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        command[1:1] = launch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    log = out.with_suffix(".log")
    with open(log, "w") as output:  # a file, not a pipe: a full pipe would stall the build
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        peak = 0
        while process.poll() is None:
            if memory:
                peak = max(peak, tree_memory(process.pid))
            time.sleep(0.1)
    text = log.read_text()
    if process.returncode:
        raise SystemExit(f"build failed ({' '.join(command)}):\n{text[-3000:]}")
    seconds, encode = map(float, re.search(r": ([\d.]+) s, of which ([\d.]+) s", text).groups())
    tasks = json.loads((out / "report.json").read_text())["tasks"]
    shutil.rmtree(out)
    return {
        "examples": sum(t["rows"] for t in tasks.values()),
        "seconds": seconds,
        "encode": encode,
        "peak": peak,
        "load": (load + os.getloadavg()[0]) / 2,
    }


def _count(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def parallel_capacity(work_items: int = 4, n: int = 5_000_000) -> float:
    """How much faster 2 processes finish a pure-Python loop than 1: the most a build can gain
    from a second worker or rank here (near 2 on 2 idle cores; less when others hold them)."""
    seconds = []
    for processes in (1, 2):
        start = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_count, [n] * work_items)
        seconds.append(time.perf_counter() - start)
    return seconds[0] / seconds[1]


def scale_rates(args, work: Path) -> None:
    print(f"\n2 processes vs 1 on a pure-Python loop: {parallel_capacity():.2f}x "
          f"(load {os.getloadavg()[0]:.1f}); the ceiling of the ratios below")  # fmt: skip
    torch.manual_seed(0)
    VQGAN(tokenizer_preset("cpu-64-f8-1024")).eval().save_pretrained(work / "tok")
    print(f"\nwriting {args.sa1b} SA-1B-like and {args.coco} COCO-like examples (x10 for memory)")
    write_sa1b(work / "sa1b", args.sa1b, args.masks, replicas=10)
    coco = write_coco(work / "coco", args.coco, replicas=1)
    cases = {
        "sa1b": [{"format": "sa1b", "folder": str(work / "sa1b")}],
        "coco": [{"format": "coco_keypoints", "json_path": str(coco),
                  "image_dir": str(work / "coco" / "images")}],
    }  # fmt: skip

    def config(name: str, sources: list[dict]) -> Path:
        lines = [f'out = "{work / "unused"}"', f'tokenizer = "{work / "tok"}"', 'balance = "none"',
                 f"shard_size = {args.shard_size}", "batch_size = 32"]  # fmt: skip
        for spec in sources:
            lines.append("[[sources]]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in spec.items()]
        path = work / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # 1x of SA-1B: only the first replica (sa_N.jpg), in a folder of its own.
    one = work / "sa1b_1x"
    one.mkdir()
    for i in range(args.sa1b):
        for suffix in (".jpg", ".json"):
            os.link(work / "sa1b" / f"sa_{i}{suffix}", one / f"sa_{i}{suffix}")
    configs = {"sa1b": config("sa1b", [{"format": "sa1b", "folder": str(one)}]),
               "coco": config("coco", cases["coco"])}  # fmt: skip
    setups = [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    print(f"\n{'build (64 px VQGAN)':<20} {'ranks':>5} {'workers':>7} {'examples':>8} "
          f"{'seconds':>8} {'examples/s':>10} {'x 0 workers':>11} {'x 1 worker':>10} "
          f"{'in tokenizer':>12} {'load':>5}")  # fmt: skip
    per_worker = {}
    for name, path in configs.items():
        rows = {setup: run_build(path, work / "out", *setup) for setup in setups}
        rates = {setup: row["examples"] / row["seconds"] for setup, row in rows.items()}
        per_worker[name] = rates[1, 2] / 2
        for (ranks, workers), row in rows.items():
            rate = rates[ranks, workers]
            print(f"{name:<20} {ranks:>5} {workers:>7} {row['examples']:>8} "
                  f"{row['seconds']:>8.1f} {rate:>10.2f} {rate / rates[1, 0]:>10.2f}x "
                  f"{rate / rates[1, 1]:>9.2f}x {row['encode'] / row['seconds']:>12.0%} "
                  f"{row['load']:>5.1f}")  # fmt: skip
    print(f"\nper GPU with {args.gpu_workers} decoding workers, each as fast as one of 2 workers "
          "here (the tokenizer on a GPU is not the limit):")  # fmt: skip
    for name, rate in per_worker.items():
        print(f"{name:<20} {rate * args.gpu_workers:>8.1f} examples/s per GPU")
    sa1b_hours = 11.1e6 / (per_worker["sa1b"] * args.gpu_workers * args.gpus) / 3600
    print(f"SA-1B's 11.1M photos on {args.gpus} GPUs: about {sa1b_hours:.0f} h")
    print(f"\n{'peak memory vs examples':<26} {'ranks':>5} {'workers':>7} {'examples':>8} "
          f"{'seconds':>8} {'examples/s':>10} {'peak memory':>11} {'load':>5}")  # fmt: skip
    ten = config("sa1b_10x", cases["sa1b"])
    for label, path in (("sa1b 1x", configs["sa1b"]), ("sa1b 10x", ten)):
        row = run_build(path, work / "out", 1, 2, memory=True)
        print(f"{label:<26} {1:>5} {2:>7} {row['examples']:>8} {row['seconds']:>8.1f} "
              f"{row['examples'] / row['seconds']:>10.2f} {row['peak'] / 2**20:>8.0f} MiB "
              f"{row['load']:>5.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["serve", "build", "scale"],
                        choices=["serve", "build", "scale"])  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="sentences per train_batch call")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per serving row")
    parser.add_argument("--segmentation", type=int, default=200, help="toy world head task")
    parser.add_argument("--tail", type=int, default=10, help="toy world pose and derain each")
    parser.add_argument("--sa1b", type=int, default=8, help="SA-1B-like photos (scaling)")
    parser.add_argument("--masks", type=int, default=100, help="masks per SA-1B-like photo")
    parser.add_argument("--coco", type=int, default=64, help="COCO-like photos (scaling)")
    parser.add_argument("--shard-size", type=int, default=4, help="units per shard (scaling)")
    parser.add_argument("--gpu-workers", type=int, default=7,
                        help="decoding workers per GPU for the per-GPU estimate (scaling)")  # fmt: skip
    parser.add_argument("--gpus", type=int, default=32, help="GPUs of the SA-1B estimate")
    parser.add_argument("--results", metavar="DIR",
                        help="also write the tables to DIR/results.md (for `delvm results`)")  # fmt: skip
    args = parser.parse_args()
    title = "Data build throughput: `benchmarks/data_throughput.py`"
    with results_file(args.results, title), tempfile.TemporaryDirectory() as tmp:
        print(f"{os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.2f} at the start")
        if "serve" in args.parts:
            serve_rates(args, Path(tmp))
        if "build" in args.parts:
            build = build_rates(args, Path(tmp))
            print(f"\n{'build (' + str(build['examples']) + ' examples incl. copies)':<42} "
                  f"{'examples/s':>10}")  # fmt: skip
            print(f"{'end to end (cpu-64-f8-1024 VQGAN)':<42} {build['total']:>10,.1f}")
            print(f"{'without the tokenizer':<42} {build['without']:>10,.1f}")
            print(f"{'the tokenizer alone':<42} {build['encode']:>10,.1f}")
        if "scale" in args.parts:
            scale_rates(args, Path(tmp))


def serve_rates(args, work: Path) -> None:
    train_tps, params = training_tokens_per_second(seq_len=256, batch=8, steps=3)
    print(f"training: {params / 1e6:.1f}M-parameter model, 8 x 256 tokens per step, "
          f"{train_tps:,.0f} tokens/s on this machine")  # fmt: skip
    cases = [
        ("demo: 64 px, 8x8 tokens", 8, 256, {"segmentation": 2000, "pose": 1900, "derain": 1900}),
        ("paper: 256 px, 16x16 tokens", 16, 2048, {"a": 20000, "b": 20000, "c": 20000}),
    ]
    rows = []
    for name, grid, seq_len, counts in cases:
        store = synthetic_store(work / name.split(":")[0], grid, counts)
        sampler = SentenceSampler(store, SamplerConfig(seq_len=seq_len, balance="resample"))
        rate = sentences_per_second(sampler, args.batch, args.seconds)
        rows.append((name, seq_len, rate, rate * seq_len / train_tps))
    print(f"\n{'served from the store':<30} {'seq':>5} {'sentences/s':>12} {'tokens/s':>12} "
          f"{'x training':>11}")  # fmt: skip
    for name, seq_len, rate, ratio in rows:
        print(f"{name:<30} {seq_len:>5} {rate:>12,.0f} {rate * seq_len:>12,.0f} {ratio:>10,.0f}x")


if __name__ == "__main__":
    main()
