"""Folder encode / decode / reconstruct: every kind of file, bad files, torchrun shards, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from delvm.cli import main
from delvm.data.images import load_image, load_square, resize_center_crop
from delvm.errors import DelvmError
from delvm.tokenizer import VQGAN, load_tokenizer
from delvm.tokenizer.folders import (
    Shard,
    decode_tokens,
    encode_folder,
    read_tokens,
    reconstruct_folder,
)
from tests.support.tiny import TINY_VQGAN as TINY

GOOD = [
    "a_rgba.png",
    "b_gray.png",
    "c_palette.gif",
    "d_16bit.png",
    "e_cmyk.jpg",
    "f_exif_rotated.jpg",
    "g_wide.bmp",
    "sub/h_nested.webp",
]
BAD = ["x_empty.png", "y_truncated.jpg", "z_text.png"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return VQGAN(TINY).save_pretrained(tmp_path_factory.mktemp("tok") / "tokenizer")


def _noise(rng, h, w, c=3) -> np.ndarray:
    return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Good files of every kind users have, plus three bad ones."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(_noise(rng, 40, 40, 4), "RGBA").save(root / GOOD[0])
    Image.fromarray(_noise(rng, 48, 40, 1), "L").save(root / GOOD[1])
    Image.fromarray(_noise(rng, 40, 40)).convert("P").save(root / GOOD[2])
    Image.fromarray(rng.integers(0, 65536, (36, 36), dtype=np.uint16)).save(root / GOOD[3])
    Image.fromarray(_noise(rng, 40, 40)).convert("CMYK").save(root / GOOD[4])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(_noise(rng, 32, 64)).save(root / GOOD[5], exif=exif)
    Image.fromarray(_noise(rng, 32, 96)).save(root / GOOD[6])
    Image.fromarray(_noise(rng, 50, 50)).save(root / GOOD[7])
    (root / BAD[0]).write_bytes(b"")
    Image.fromarray(_noise(rng, 64, 64)).save(root / BAD[1], quality=95)
    (root / BAD[1]).write_bytes((root / BAD[1]).read_bytes()[:300])
    (root / BAD[2]).write_text("not an image at all\n")
    return root


def test_encode_keeps_every_good_file_and_reports_bad_ones(tokenizer, images, tmp_path):
    model = load_tokenizer(tokenizer)
    manifest = encode_folder(model, images, tmp_path / "tokens", batch_size=3)
    assert manifest["files"] == sorted(GOOD)
    assert [s["file"] for s in manifest["skipped"]] == BAD
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert "empty file" in reasons["x_empty.png"]
    assert "truncated" in reasons["y_truncated.jpg"]
    assert "not an image" in reasons["z_text.png"]
    ids, names, identity = read_tokens(tmp_path / "tokens")
    assert ids.dtype == np.uint16 and ids.shape == (len(GOOD), 256)
    assert names == sorted(GOOD) and identity["fingerprint"] == model.fingerprint()
    # each row is exactly what encoding that file alone gives
    for row, name in enumerate(names):
        alone = model.encode(load_square(images / name, 32)[None])
        assert np.array_equal(ids[row], alone[0].numpy()), name


def test_exif_orientation_is_applied(images):
    path = images / "f_exif_rotated.jpg"
    with Image.open(path) as raw:
        assert raw.size == (64, 32)  # stored wide, displayed tall
        shown = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
        stored = np.asarray(raw.convert("RGB"))
    assert shown.shape == (64, 32, 3)
    assert np.array_equal(load_image(path), shown)
    # The tokenizer's square is the centre of the image as shown, not as stored.
    square = load_square(path, 32)
    assert np.array_equal(square, resize_center_crop(shown, 32))
    assert not np.array_equal(square, resize_center_crop(stored, 32))


def test_shards_split_the_sorted_list_without_gaps():
    items = list(range(10))
    parts = [Shard(r, 3).take(items) for r in range(3)]
    assert sum(parts, []) == items and [len(p) for p in parts] == [3, 3, 4]
    assert Shard(4, 5).take([1, 2]) == [2] and Shard(0, 5).take([1, 2]) == []


def test_shard_from_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Shard.from_env() == Shard(1, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DelvmError, match="outside WORLD_SIZE"):
        Shard.from_env()


def test_sharded_encode_equals_one_process(tokenizer, images, tmp_path):
    model = load_tokenizer(tokenizer)
    encode_folder(model, images, tmp_path / "one")
    for rank in range(3):
        encode_folder(model, images, tmp_path / "three", shard=Shard(rank, 3))
    one, three = read_tokens(tmp_path / "one"), read_tokens(tmp_path / "three")
    assert np.array_equal(one[0], three[0]) and one[1] == three[1]
    (tmp_path / "three" / "tokens-00001-of-00003.json").unlink()
    with pytest.raises(DelvmError, match="incomplete shards"):
        read_tokens(tmp_path / "three")


def test_decode_and_reconstruct(tokenizer, images, tmp_path):
    model = load_tokenizer(tokenizer)
    encode_folder(model, images, tmp_path / "tokens")
    assert decode_tokens(model, tmp_path / "tokens", tmp_path / "decoded") == len(GOOD)
    ids, names, _ = read_tokens(tmp_path / "tokens")
    first = np.asarray(Image.open((tmp_path / "decoded" / names[0]).with_suffix(".png")))
    expected = model.decode(ids[:1].astype(np.int64))[0].permute(1, 2, 0).numpy()
    assert np.abs(first / 255.0 - expected).max() <= 0.5 / 255 + 1e-6
    assert (tmp_path / "decoded" / "sub" / "h_nested.png").is_file()

    report = reconstruct_folder(model, images, tmp_path / "recon", batch_size=4)
    assert report["images"] == len(GOOD) and len(report["skipped"]) == len(BAD)
    assert set(report["psnr"]) == set(GOOD)
    for name in GOOD:  # each file: its own round trip, written out and scored against its pixels
        pixels = load_square(images / name, 32)
        recon = model.decode(model.encode(pixels[None]))[0].permute(1, 2, 0).numpy()
        written = np.asarray(Image.open((tmp_path / "recon" / name).with_suffix(".png")))
        assert np.abs(written / 255.0 - recon).max() <= 0.5 / 255 + 1e-6, name
        mse = np.mean((pixels / 255.0 - recon) ** 2)
        assert report["psnr"][name] == pytest.approx(10 * np.log10(1 / mse), abs=1e-3), name
    assert report["mean_psnr"] == pytest.approx(np.mean(list(report["psnr"].values())))
    assert (tmp_path / "recon" / "reconstruct-00000-of-00001.json").is_file()

    np.save(tmp_path / "plain.npy", ids[:2].astype(np.int64))
    assert decode_tokens(model, tmp_path / "plain.npy", tmp_path / "plain") == 2
    assert (tmp_path / "plain" / "000001.png").is_file()


def test_decode_refuses_tokens_of_another_tokenizer(tokenizer, images, tmp_path):
    encode_folder(load_tokenizer(tokenizer), images, tmp_path / "tokens")
    torch.manual_seed(1)
    with pytest.raises(DelvmError, match="decode with the tokenizer that encoded them"):
        decode_tokens(VQGAN(TINY), tmp_path / "tokens", tmp_path / "out")


def test_missing_and_empty_folders(tokenizer, tmp_path):
    model = load_tokenizer(tokenizer)
    with pytest.raises(DelvmError, match="missing: no such folder"):
        encode_folder(model, tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DelvmError, match="empty: no image files"):
        encode_folder(model, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DelvmError, match="no tokens-"):
        read_tokens(tmp_path / "empty")


def test_cli_encode_decode_reconstruct(tokenizer, images, tmp_path, capsys):
    tok = str(tokenizer)
    assert (
        main(
            [
                "tokenizer",
                "encode",
                str(images),
                str(tmp_path / "t"),
                "--tokenizer",
                tok,
                "--batch-size",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"{len(GOOD)} images" in out and "skipped z_text.png" in out
    assert (
        main(["tokenizer", "decode", str(tmp_path / "t"), str(tmp_path / "d"), "--tokenizer", tok])
        == 0
    )
    assert len(list((tmp_path / "d").rglob("*.png"))) == len(GOOD)
    assert (
        main(["tokenizer", "reconstruct", str(images), str(tmp_path / "r"), "--tokenizer", tok])
        == 0
    )
    assert "mean PSNR" in capsys.readouterr().out


def test_cli_errors_are_one_line(tokenizer, tmp_path, capsys):
    assert (
        main(
            [
                "tokenizer",
                "encode",
                str(tmp_path / "nope"),
                str(tmp_path / "o"),
                "--tokenizer",
                str(tokenizer),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("delvm: error: ") and "nope" in err and "\n" not in err
    assert (
        main(
            [
                "tokenizer",
                "encode",
                str(tmp_path),
                str(tmp_path / "o"),
                "--tokenizer",
                str(tmp_path / "no-tokenizer"),
            ]
        )
        == 2
    )
    assert "no-tokenizer: not a tokenizer folder" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_ranks_write_two_shards(tokenizer, images, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "delvm.cli",
            "tokenizer",
            "encode",
            str(images),
            str(tmp_path / "tokens"),
            "--tokenizer",
            str(tokenizer),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    shards = sorted(p.name for p in (tmp_path / "tokens").glob("*.json"))
    assert shards == ["tokens-00000-of-00002.json", "tokens-00001-of-00002.json"]
    ranks = [json.loads((tmp_path / "tokens" / s).read_text()) for s in shards]
    assert ranks[0]["files"] + ranks[1]["files"] == sorted(GOOD)
    encode_folder(load_tokenizer(tokenizer), images, tmp_path / "single")
    assert np.array_equal(read_tokens(tmp_path / "tokens")[0], read_tokens(tmp_path / "single")[0])
