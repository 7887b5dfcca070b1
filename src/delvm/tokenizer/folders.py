"""Tokenize, detokenize and reconstruct whole folders, batched, one shard per torchrun rank.

Output of `encode_folder` (one pair of files per rank; a plain run is rank 0 of 1):

    OUT/tokens-00000-of-00002.npy    uint16 [n, h*w] code ids (int32 if the codebook > 65536)
    OUT/tokens-00000-of-00002.json   {"format": "delvm-tokens", "files": [row i's path relative
                                      to the input folder], "skipped": [{"file", "reason"}],
                                      "tokenizer": {fingerprint, num_codes, grid_size,
                                      resolution}, "rank", "world_size", "source"}

Rank r takes the r-th contiguous block of the sorted file list, so reading the shards in rank
order gives the sorted order. Files that cannot be read are skipped and listed with the reason;
every good file is kept. The JSON is written after the array, so a shard with a JSON is complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from delvm.data.images import IMAGE_SUFFIXES, list_images, load_square
from delvm.errors import DelvmError
from delvm.fileio import atomic_write, read_json, write_json
from delvm.tokenizer.quality import psnr
from delvm.tokenizer.vqgan import VQGAN

FORMAT = "delvm-tokens"


@dataclass(frozen=True)
class Shard:
    """This process's part of a job: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """RANK / WORLD_SIZE as torchrun sets them; a plain launch is rank 0 of 1."""
        try:
            shard = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
        except ValueError:
            raise DelvmError(
                "RANK and WORLD_SIZE must be integers (as torchrun sets them)"
            ) from None
        if not 0 <= shard.rank < shard.world_size:
            raise DelvmError(f"RANK {shard.rank} is outside WORLD_SIZE {shard.world_size}")
        return shard

    def take(self, items: list) -> list:
        """The rank-th of world_size contiguous, near-equal blocks of ``items``."""
        n = len(items)
        return items[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]

    def name(self, stem: str, suffix: str) -> str:
        return f"{stem}-{self.rank:05d}-of-{self.world_size:05d}{suffix}"


@dataclass
class Loaded:
    """A batch of readable images and the files of the batch that were not."""

    paths: list[Path]
    images: np.ndarray  # uint8 [b, S, S, 3]
    skipped: list[dict] = field(default_factory=list)


class SquareImages(Dataset):
    """Files read as size x size RGB squares: (path, array, None) or (path, None, reason)."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Path, np.ndarray | None, str | None]:
        try:
            return self.paths[i], load_square(self.paths[i], self.size), None
        except DelvmError as err:
            return self.paths[i], None, str(err)


def load_batches(paths: list[Path], size: int, batch_size: int, workers: int) -> Iterator[Loaded]:
    """Read ``paths`` as size x size squares in batches; ``workers`` processes decode ahead."""
    loader = DataLoader(
        SquareImages(paths, size), batch_size=batch_size, num_workers=workers, collate_fn=list
    )
    for items in loader:
        good = [(p, a) for p, a, _ in items if a is not None]
        images = np.stack([a for _, a in good]) if good else np.zeros((0, size, size, 3), np.uint8)
        skipped = [{"file": str(p), "reason": r} for p, _, r in items if r is not None]
        yield Loaded([p for p, _ in good], images, skipped)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _token_dtype(num_codes: int) -> np.dtype:
    return np.dtype(np.uint16) if num_codes <= 65536 else np.dtype(np.int32)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, array)


def tokenizer_identity(model: VQGAN) -> dict:
    return {
        "fingerprint": model.fingerprint(),
        "num_codes": model.num_codes,
        "grid_size": model.grid_size,
        "resolution": model.config.resolution,
    }


def encode_folder(
    model: VQGAN,
    folder: str | Path,
    out: str | Path,
    batch_size: int = 16,
    workers: int = 0,
    shard: Shard | None = None,
    bf16: bool = False,
) -> dict:
    """Tokenize this rank's share of the images under ``folder``; returns the shard manifest."""
    folder, out, shard = Path(folder), Path(out), shard or Shard()
    files = list_images(folder)
    if not files:
        raise DelvmError(f"{folder}: no image files (looked for {', '.join(IMAGE_SUFFIXES)})")
    mine = shard.take(files)
    tokens = model.grid_size**2
    rows, names, skipped = [], [], []
    bar = tqdm(total=len(mine), desc=f"encode {shard.rank}", unit="img", disable=shard.rank != 0)
    size = model.config.resolution
    for batch in load_batches(mine, size, batch_size, workers):
        if len(batch.paths):
            rows.append(model.encode(batch.images, bf16=bf16).cpu().numpy())
        names += [_relative(p, folder) for p in batch.paths]
        skipped += [{**s, "file": _relative(Path(s["file"]), folder)} for s in batch.skipped]
        bar.update(len(batch.paths) + len(batch.skipped))
    bar.close()
    dtype = _token_dtype(model.num_codes)
    ids = np.concatenate(rows).astype(dtype) if rows else np.zeros((0, tokens), dtype)
    out.mkdir(parents=True, exist_ok=True)
    array_name = shard.name("tokens", ".npy")
    atomic_write(out / array_name, lambda tmp: _save_npy(tmp, ids))
    manifest = {
        "format": FORMAT,
        "tokens_file": array_name,
        "shape": list(ids.shape),
        "dtype": dtype.name,
        "source": str(folder),
        "rank": shard.rank,
        "world_size": shard.world_size,
        "tokenizer": tokenizer_identity(model),
        "files": names,
        "skipped": skipped,
    }
    write_json(out / shard.name("tokens", ".json"), manifest)
    return manifest


def read_tokens(folder: str | Path) -> tuple[np.ndarray, list[str], dict]:
    """All shards of an `encode_folder` output: ids [N, h*w], row names, tokenizer identity."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DelvmError(f"{folder}: no such token folder (the output of `tokenizer encode`)")
    manifests = sorted(folder.glob("tokens-*-of-*.json"))
    if not manifests:
        raise DelvmError(f"{folder}: no tokens-*.json manifests; run `delvm tokenizer encode`")
    metas = [read_json(p) for p in manifests]
    world = {m.get("world_size") for m in metas}
    ranks = sorted(m.get("rank") for m in metas)
    if len(world) != 1 or ranks != list(range(next(iter(world)))):
        raise DelvmError(
            f"{folder}: incomplete shards (ranks {ranks} of world sizes {sorted(world)}); "
            "rerun the encode for the missing ranks"
        )
    identities = {m["tokenizer"]["fingerprint"] for m in metas}
    if len(identities) != 1:
        raise DelvmError(f"{folder}: shards were made by different tokenizers {sorted(identities)}")
    arrays, names = [], []
    for meta, path in zip(metas, manifests, strict=True):
        array_path = folder / meta["tokens_file"]
        try:
            ids = np.load(array_path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DelvmError(f"{array_path}: unreadable token array ({err})") from None
        if list(ids.shape) != meta["shape"] or len(meta["files"]) != ids.shape[0]:
            raise DelvmError(f"{array_path}: shape {ids.shape} does not match {path.name}")
        arrays.append(ids)
        names += meta["files"]
    return np.concatenate(arrays), names, metas[0]["tokenizer"]


def save_png(image: torch.Tensor, path: Path) -> None:
    """A float [C, H, W] image in [0, 1] as an 8-bit PNG (rounded, not truncated)."""
    array = (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def decode_tokens(
    model: VQGAN,
    tokens: str | Path,
    out: str | Path,
    batch_size: int = 16,
    shard: Shard | None = None,
    bf16: bool = False,
) -> int:
    """Decode an `encode_folder` output (or an .npy of ids [N, h*w]) to PNGs; returns the count.

    Images keep their source's relative path with a .png suffix (``{row:06d}.png`` for an .npy).
    """
    tokens, out, shard = Path(tokens), Path(out), shard or Shard()
    if tokens.suffix == ".npy":
        try:
            ids = np.load(tokens, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DelvmError(f"{tokens}: unreadable .npy of token ids ({err})") from None
        if ids.ndim != 2:
            raise DelvmError(f"{tokens}: expected ids [images, tokens], got shape {ids.shape}")
        names = [f"{i:06d}" for i in range(len(ids))]
    else:
        ids, names, identity = read_tokens(tokens)
        if identity["fingerprint"] != model.fingerprint():
            raise DelvmError(
                f"{tokens}: encoded by tokenizer {identity['fingerprint']}, but this one is "
                f"{model.fingerprint()}; decode with the tokenizer that encoded them"
            )
    rows = shard.take(list(range(len(ids))))
    bar = tqdm(total=len(rows), desc=f"decode {shard.rank}", unit="img", disable=shard.rank != 0)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = model.decode(ids[chunk[0] : chunk[-1] + 1], bf16=bf16)
        for row, image in zip(chunk, images, strict=True):
            save_png(image, (out / names[row]).with_suffix(".png"))
        bar.update(len(chunk))
    bar.close()
    return len(rows)


def reconstruct_folder(
    model: VQGAN,
    folder: str | Path,
    out: str | Path,
    batch_size: int = 16,
    workers: int = 0,
    shard: Shard | None = None,
    bf16: bool = False,
) -> dict:
    """Encode + decode this rank's images, write them as PNGs, and report PSNR per file."""
    folder, out, shard = Path(folder), Path(out), shard or Shard()
    files = list_images(folder)
    if not files:
        raise DelvmError(f"{folder}: no image files (looked for {', '.join(IMAGE_SUFFIXES)})")
    scores, skipped = {}, []
    mine = shard.take(files)
    bar = tqdm(total=len(mine), desc=f"reconstruct {shard.rank}", disable=shard.rank != 0)
    for batch in load_batches(mine, model.config.resolution, batch_size, workers):
        skipped += [{**s, "file": _relative(Path(s["file"]), folder)} for s in batch.skipped]
        if len(batch.paths):
            recon = model.decode(model.encode(batch.images, bf16=bf16), bf16=bf16)
            reference = model.to_pixels(batch.images)
            for path, image, score in zip(
                batch.paths, recon, psnr(reference, recon).tolist(), strict=True
            ):
                name = _relative(path, folder)
                scores[name] = score
                save_png(image, (out / name).with_suffix(".png"))
        bar.update(len(batch.paths) + len(batch.skipped))
    bar.close()
    report = {
        "source": str(folder),
        "rank": shard.rank,
        "world_size": shard.world_size,
        "tokenizer": tokenizer_identity(model),
        "images": len(scores),
        "mean_psnr": sum(scores.values()) / len(scores) if scores else None,
        "psnr": scores,
        "skipped": skipped,
    }
    write_json(out / shard.name("reconstruct", ".json"), report)
    return report
