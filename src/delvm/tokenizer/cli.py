"""`delvm tokenizer train | encode | decode | reconstruct`.

encode / decode / reconstruct split their work by RANK / WORLD_SIZE when launched with
``torchrun --nproc_per_node N -m delvm.cli tokenizer ...`` (each rank one shard, its own output
files); train runs DDP under torchrun.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import fields
from pathlib import Path

import torch

from delvm.devices import add_device_argument, add_dtype_argument, inference_dtype, resolve_device
from delvm.errors import DelvmError
from delvm.tokenizer.folders import Shard, decode_tokens, encode_folder, reconstruct_folder
from delvm.tokenizer.vqgan import VQGAN, load_tokenizer

_TRAIN_HELP = {
    "data": "folder of training images (required)",
    "out": "run folder: checkpoints, log, final tokenizer; rerun to resume",
    "preset": "tokenizer shape and its training recipe (cpu-64-f8-1024, f16-8192)",
    "model": "override a VQGANConfig field of the preset, e.g. --model num_embeddings=512",
    "perceptual_weights": "local VGG16 weights (torchvision state dict) and optionally LPIPS "
    "heads (lpips vgg.pth); repeat for several files",
    "gan_weight": "PatchGAN loss weight (0: no discriminator)",
    "restart_every": "re-seed codes unused for this many steps (0: never)",
    "val_images": "held-out images for PSNR and codebook usage",
}


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _model_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DelvmError(f"--model {pair!r}: expected KEY=VALUE, e.g. num_embeddings=512")
        out[key.strip()] = _literal(value.strip())
    return out


def _train(args: argparse.Namespace) -> None:
    from delvm.tokenizer.train import TokenizerTrainConfig, TokenizerTrainer, recipe

    given = {f.name: getattr(args, f.name) for f in fields(TokenizerTrainConfig)}
    given = {k: v for k, v in given.items() if v is not None}
    given["model"] = _model_overrides(given.get("model", []))
    if not given.get("data"):
        raise DelvmError("tokenizer train: --data FOLDER is required")
    report = TokenizerTrainer(recipe(given.pop("preset", "cpu-64-f8-1024"), **given)).run()
    final = report.get("final", {})
    if final:
        print(
            f"done: {report['steps']} steps in {report['train_seconds']:.0f} s; held-out PSNR "
            f"{final['psnr']:.2f} dB, codes used {final['used_codes']} "
            f"({100 * final['usage']:.1f} %), perplexity {final['perplexity']:.0f}; "
            f"tokenizer in {report['tokenizer']}"
        )


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TokenizerTrainConfig field; unset flags keep the preset's recipe."""
    from delvm.tokenizer.train import TokenizerTrainConfig

    defaults = TokenizerTrainConfig()
    for f in fields(TokenizerTrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        text = _TRAIN_HELP.get(f.name, f"default {default!r}")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, list | dict):
            p.add_argument(flag, action="append", default=None, metavar="VALUE", help=text)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=float, nargs=len(default), default=None, help=text)
        else:
            p.add_argument(flag, type=type(default), default=None, help=text)


def _inference_args(p: argparse.ArgumentParser, source: str) -> None:
    p.add_argument("source", type=Path, help=source)
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder")
    p.add_argument("--batch-size", type=int, default=16)
    add_dtype_argument(p, ("auto", "fp32", "bf16"))  # bf16: autocast; weights stay fp32
    add_device_argument(p)


def _open_tokenizer(args: argparse.Namespace) -> tuple[VQGAN, bool]:
    """The tokenizer on ``--device``, and whether ``--dtype`` asks for bf16 autocast."""
    device = resolve_device(args.device)
    bf16 = inference_dtype(args.dtype, device) == torch.bfloat16
    return load_tokenizer(args.tokenizer, device), bf16


def _print_skipped(skipped: list[dict]) -> None:
    for item in skipped:
        print(f"  skipped {item['file']}: {item['reason']}")


def _encode(args: argparse.Namespace) -> None:
    shard = Shard.from_env()
    model, bf16 = _open_tokenizer(args)
    m = encode_folder(model, args.source, args.out, args.batch_size, args.workers, shard, bf16)
    print(
        f"rank {shard.rank}/{shard.world_size}: {len(m['files'])} images -> "
        f"{args.out / m['tokens_file']} ({len(m['skipped'])} skipped)"
    )
    _print_skipped(m["skipped"])


def _decode(args: argparse.Namespace) -> None:
    shard = Shard.from_env()
    model, bf16 = _open_tokenizer(args)
    count = decode_tokens(model, args.source, args.out, args.batch_size, shard, bf16)
    print(f"rank {shard.rank}/{shard.world_size}: {count} images -> {args.out}")


def _reconstruct(args: argparse.Namespace) -> None:
    shard = Shard.from_env()
    model, bf16 = _open_tokenizer(args)
    r = reconstruct_folder(model, args.source, args.out, args.batch_size, args.workers, shard, bf16)
    psnr = "n/a" if r["mean_psnr"] is None else f"{r['mean_psnr']:.2f} dB"
    print(
        f"rank {shard.rank}/{shard.world_size}: {r['images']} images -> {args.out}, mean PSNR "
        f"{psnr} ({len(r['skipped'])} skipped)"
    )
    _print_skipped(r["skipped"])


def add_commands(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train the VQGAN tokenizer; encode/decode folders")
    verbs = tok.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a VQGAN from scratch on a folder of images")
    _add_train_flags(p)
    p.set_defaults(func=_train)

    p = verbs.add_parser("encode", help="images -> token ids (one shard per torchrun rank)")
    _inference_args(p, "folder of images")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    p.set_defaults(func=_encode)

    p = verbs.add_parser("decode", help="token ids -> PNG images")
    _inference_args(p, "output folder of `tokenizer encode`, or an .npy of ids [N, tokens]")
    p.set_defaults(func=_decode)

    p = verbs.add_parser("reconstruct", help="images -> tokens -> images, with PSNR per file")
    _inference_args(p, "folder of images")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    p.set_defaults(func=_reconstruct)
