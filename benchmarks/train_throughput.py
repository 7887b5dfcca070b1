"""Trainer overhead: `Trainer.train_step` against a bare forward/backward/AdamW step, same run.

The trainer adds data composition, gradient clipping, loss all-reduce and bookkeeping; this shows
what that costs (target: <= 5 %). Both sides run the same model, batch shape and optimizer.

    python benchmarks/train_throughput.py                       # CPU, a small model
    python benchmarks/train_throughput.py --device cuda --preset 300m --seq-len 2048 \\
        --micro-batch 8 --peak-tflops 989                       # GPU: bf16 autocast, MFU
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from timing import best_seconds
from torch import Tensor

from delvm.data.sampler import SentenceBatch
from delvm.model.transformer import VisualLM
from delvm.train.config import load_config
from delvm.train.distributed import World
from delvm.train.trainer import Trainer


class RandomSentences:
    """Random token sentences: the benchmark measures compute, not learning."""

    def __init__(self, vocab: int, seq_len: int, image_tokens: int = 256):
        self.tasks, self.vocab_size, self.seq_len = ["random"], vocab, seq_len
        self.image_tokens, self.tokenizer_fingerprint = image_tokens, None

    def codebook(self) -> Tensor:
        return torch.randn(self.vocab_size, 64)

    def train_batch(self, step: int, micro: int, rows: range, tasks: list[str]):
        g = torch.Generator().manual_seed(step * 1000 + micro)
        ids = torch.randint(0, self.vocab_size, (len(rows), self.seq_len), generator=g)
        return SentenceBatch(ids, ["random"] * len(rows))

    def val_batches(self, batch_size: int):
        return []


def bare_step(model: VisualLM, ids: Tensor, autocast):
    """The plain loop every trainer is measured against: forward, loss, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))

    def step() -> None:
        with autocast:
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--hidden", type=int, default=256, help="CPU default model width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="for MFU (H100/H200: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)

    overrides = {"vocab_size": 8192, "codebook_dim": 64, "max_seq_len": args.seq_len}
    if args.preset == "tiny":
        overrides.update(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
                         num_heads=max(1, args.hidden // 64), num_layers=args.layers)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        config = load_config(None, [
            f"out={out!r}", f"model.preset={args.preset!r}", f"model.overrides={overrides!r}",
            f"micro_batch={args.micro_batch}", f"data.seq_len={args.seq_len}",
            "tensorboard=false",
        ])  # fmt: skip
        source = RandomSentences(8192, args.seq_len)
        trainer = Trainer(config, source, World(rank=0, size=1, device=device))
        ids = source.train_batch(0, 0, range(args.micro_batch), source.tasks).ids
        bare = bare_step(trainer.bare, ids.to(device), trainer.autocast)
        # Alternate the two so machine noise hits both alike; keep the best of each.
        t_trainer = t_bare = float("inf")
        for _ in range(args.repeats):
            t_trainer = min(
                t_trainer, best_seconds(lambda: trainer.train_step(source.tasks), 1, device)
            )
            t_bare = min(t_bare, best_seconds(bare, 1, device))

    tokens = args.micro_batch * (args.seq_len - 1)
    params = sum(p.numel() for p in trainer.bare.parameters() if p.requires_grad)
    rows = [("bare model step", t_bare), ("Trainer.train_step", t_trainer)]
    print(f"{args.preset} ({params / 1e6:.1f}M trainable), {args.micro_batch} x {args.seq_len} "
          f"tokens, {device}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")  # fmt: skip
    print(f"{'step':<20} | {'tokens/s':>10} | {'MFU':>6} | overhead")
    for name, seconds in rows:
        mfu = 6 * params * tokens / seconds / (args.peak_tflops * 1e12) if args.peak_tflops else 0
        overhead = seconds / t_bare - 1
        print(f"{name:<20} | {tokens / seconds:>10,.0f} | {mfu:>6.1%} | {overhead:+.1%}")


if __name__ == "__main__":
    main()
