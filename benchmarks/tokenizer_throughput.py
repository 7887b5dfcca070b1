"""Tokenizer throughput at the paper's f16-8192 shape (random weights): images/s for encode and
decode, batch 1 and 16, fp32 and bf16 — ours (`VQGAN.encode` / `VQGAN.decode` as every delvm command
calls them: inference mode, uint8 in, ids out, bf16 autocast optional) against a plain eager fp32
run of the same module in the same process.

    python benchmarks/tokenizer_throughput.py [--batch-sizes 1 16] [--repeats 2] [--device cpu]

The baseline is what a straightforward port does: the same weights, contiguous (NCHW) memory,
`torch.no_grad()`, the encoder/decoder called directly. Each cell is the best of ``--repeats``
timed calls after one warm-up call. Every row also checks that ours gives the baseline's tokens.
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

import torch
from timing import best_seconds

from delvm.tokenizer import VQGAN, preset


def baseline_encode(model: VQGAN, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = model.quant_conv(model.encoder(pixels))
        b, d, h, w = z.shape
        return model.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h * w)


def baseline_decode(model: VQGAN, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        side = model.grid_size
        z_q = model.quantize.embedding(ids).view(ids.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return model.decoder(model.post_quant_conv(z_q)).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    plain = VQGAN(preset("f16-8192")).eval().to(device)
    ours = copy.deepcopy(plain)
    side = plain.config.resolution
    print(
        f"f16-8192 VQGAN, random weights, {side} px -> {plain.grid_size**2} tokens; "
        f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("\n| op | batch | eager fp32 (img/s) | ours fp32 (img/s) | x | ours bf16 (img/s) | x |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        images = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, device=device)
        pixels = images.permute(0, 3, 1, 2).float() / 255.0
        ids = baseline_encode(plain, pixels)
        assert torch.equal(ours.encode(images), ids), "ours and the baseline disagree on tokens"
        rows = {
            "encode": (
                partial(baseline_encode, plain, pixels),
                partial(ours.encode, images),
                partial(ours.encode, images, bf16=True),
            ),
            "decode": (
                partial(baseline_decode, plain, ids),
                partial(ours.decode, ids),
                partial(ours.decode, ids, bf16=True),
            ),
        }
        for op, (base, fp32, bf16) in rows.items():
            rates = [batch / best_seconds(fn, args.repeats, device) for fn in (base, fp32, bf16)]
            print(
                f"| {op} | {batch} | {rates[0]:.2f} | {rates[1]:.2f} | "
                f"{rates[1] / rates[0]:.2f} | {rates[2]:.2f} | {rates[2] / rates[0]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
