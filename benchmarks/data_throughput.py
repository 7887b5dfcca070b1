"""Data throughput: sentences served from a token store vs what training consumes, and how fast
`delvm data build` turns sources into examples, with the tokenizer's share timed apart.

Serving: `SentenceSampler.train_batch` on stores of the demo's shape (64 px, 8x8 tokens per image,
256-token sentences) and the paper's (256 px, 16x16, 2048 tokens), beside one training step of a
~5M-parameter model at the demo's shape, on this machine, in the same run. The ratio is tokens
served per second over tokens trained per second (target >= 100).

Building: a toy world store (segmentation 20x each tail task, balance "augment") with a VQGAN of
the demo tokenizer's shape; examples/s counts original and augmented examples; "without the
tokenizer" divides by the time outside `VQGAN.encode` (sources, resize/augment, shards, store).

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --segmentation 2000 --tail 100   # the demo's world
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sentences per train_batch call")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per serving row")
    parser.add_argument("--segmentation", type=int, default=200, help="toy world head task")
    parser.add_argument("--tail", type=int, default=10, help="toy world pose and derain each")
    args = parser.parse_args()

    train_tps, params = training_tokens_per_second(seq_len=256, batch=8, steps=3)
    print(f"training: {params / 1e6:.1f}M-parameter model, 8 x 256 tokens per step, "
          f"{train_tps:,.0f} tokens/s on this machine")  # fmt: skip

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [
            (
                "demo: 64 px, 8x8 tokens",
                8,
                256,
                {"segmentation": 2000, "pose": 1900, "derain": 1900},
            ),
            ("paper: 256 px, 16x16 tokens", 16, 2048, {"a": 20000, "b": 20000, "c": 20000}),
        ]
        for name, grid, seq_len, counts in cases:
            store = synthetic_store(Path(tmp) / name.split(":")[0], grid, counts)
            sampler = SentenceSampler(store, SamplerConfig(seq_len=seq_len, balance="resample"))
            rate = sentences_per_second(sampler, args.batch, args.seconds)
            rows.append((name, seq_len, rate, rate * seq_len / train_tps))
        build = build_rates(args, Path(tmp))

    print(f"\n{'served from the store':<30} {'seq':>5} {'sentences/s':>12} {'tokens/s':>12} "
          f"{'x training':>11}")  # fmt: skip
    for name, seq_len, rate, ratio in rows:
        print(f"{name:<30} {seq_len:>5} {rate:>12,.0f} {rate * seq_len:>12,.0f} {ratio:>10,.0f}x")
    print(
        f"\n{'build (' + str(build['examples']) + ' examples incl. copies)':<42} {'examples/s':>10}"
    )
    print(f"{'end to end (cpu-64-f8-1024 VQGAN)':<42} {build['total']:>10,.1f}")
    print(f"{'without the tokenizer':<42} {build['without']:>10,.1f}")
    print(f"{'the tokenizer alone':<42} {build['encode']:>10,.1f}")


if __name__ == "__main__":
    main()
