"""Tokenizer training: exact resume, dead-code restarts, the GAN and LPIPS parts, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from delvm.cli import main
from delvm.errors import DelvmError
from delvm.tokenizer import load_tokenizer
from delvm.tokenizer.losses import LPIPS, PatchDiscriminator, adaptive_gan_weight, hinge_d_loss
from delvm.tokenizer.quality import codebook_usage, psnr
from delvm.tokenizer.train import (
    BatchPlan,
    TokenizerTrainConfig,
    TokenizerTrainer,
    balance_by_folder,
    lr_at,
    recipe,
    split_held_out,
)
from delvm.train.distributed import World

TINY_MODEL = {
    "resolution": 32,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "z_channels": 8,
    "num_embeddings": 64,
    "quantized_embed_dim": 8,
}
ONE = World(rank=0, size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """24 small images: a flat background and one coloured rectangle or ellipse."""
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    for i in range(24):
        image = Image.new("RGB", (40, 40), tuple(int(c) for c in rng.integers(0, 256, 3)))
        box = sorted(rng.integers(0, 40, 2).tolist()), sorted(rng.integers(0, 40, 2).tolist())
        shape = ImageDraw.Draw(image).rectangle if i % 2 else ImageDraw.Draw(image).ellipse
        shape(
            [box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1],
            fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
        )
        image.save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory) -> list[Path]:
    """Random weights in the layouts of torchvision's vgg16 and lpips' vgg.pth."""
    root = tmp_path_factory.mktemp("vgg")
    torch.manual_seed(0)
    reference = LPIPS()
    features = {f"features.{k}": v for k, v in reference.features.state_dict().items()}
    features["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry these too
    torch.save(features, root / "vgg16.pth")
    heads = {
        f"lin{i}.model.1.weight": torch.rand_like(lin.weight)
        for i, lin in enumerate(reference.lins)
    }
    torch.save(heads, root / "lpips_vgg.pth")
    return [root / "vgg16.pth", root / "lpips_vgg.pth"]


def config(scenes: Path, out: Path, **changes) -> TokenizerTrainConfig:
    base = dict(
        data=str(scenes),
        out=str(out),
        model=TINY_MODEL,
        steps=4,
        batch_size=4,
        warmup_steps=2,
        restart_every=2,
        val_images=4,
        eval_every=2,
        checkpoint_every=2,
        log_every=1,
    )
    return recipe("cpu-64-f8-1024", **{**base, **changes})


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_tokenizer(out / "tokenizer").state_dict()


def test_resume_equals_an_uninterrupted_run(scenes, vgg_files, tmp_path, monkeypatch):
    changes = dict(gan_weight=0.5, gan_start=1, perceptual_weights=[str(p) for p in vgg_files])
    whole = TokenizerTrainer(config(scenes, tmp_path / "whole", **changes), ONE).run()

    step = TokenizerTrainer.train_step

    def stop_after_two(self, x):  # a SIGTERM arriving during step 2
        record = step(self, x)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(TokenizerTrainer, "train_step", stop_after_two)
    assert TokenizerTrainer(config(scenes, tmp_path / "split", **changes), ONE).run() == {}
    monkeypatch.undo()
    assert not (tmp_path / "split" / "tokenizer").exists()
    resumed = TokenizerTrainer(config(scenes, tmp_path / "split", **changes), ONE).run()

    logs = [json.loads(x) for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "rec" in r] == [1, 2, 3, 4]  # went on from step 2
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    timeless = [{k: v for k, v in r["final"].items() if k != "seconds"} for r in (whole, resumed)]
    assert timeless[0] == timeless[1] and whole["fingerprint"] == resumed["fingerprint"]
    disc = [
        torch.load(p / "checkpoints" / "step-000004" / "training_state.pt", weights_only=True)
        for p in (tmp_path / "whole", tmp_path / "split")
    ]
    assert torch.equal(disc[0]["counts"], disc[1]["counts"])
    logs = [
        json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    ]
    assert any("d" in r and "lpips" in r and "gan_weight" in r for r in logs)


def test_resume_refuses_changed_settings(scenes, tmp_path):
    TokenizerTrainer(config(scenes, tmp_path, steps=2), ONE).run()
    with pytest.raises(DelvmError, match="written with lr=0.001"):
        TokenizerTrainer(config(scenes, tmp_path, steps=2, lr=0.002), ONE).run()


def test_resume_accepts_a_checkpoint_older_than_a_new_setting(scenes, tmp_path):
    TokenizerTrainer(config(scenes, tmp_path, steps=2), ONE).run()
    state_file = tmp_path / "checkpoints" / "step-000002" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["config"]["balance_folders"]  # as written before the setting existed
    torch.save(state, state_file)
    trainer = TokenizerTrainer(config(scenes, tmp_path, steps=2), ONE)
    assert trainer.resume() and trainer.step == 2
    changed = TokenizerTrainer(config(scenes, tmp_path, steps=2, balance_folders=True), ONE)
    with pytest.raises(DelvmError, match="written with balance_folders=False"):
        changed.resume()


def test_training_learns_and_reports(scenes, tmp_path):
    trainer = TokenizerTrainer(
        config(scenes, tmp_path, steps=60, eval_every=30, checkpoint_every=60), ONE
    )
    before = trainer.evaluate()
    report = trainer.run()
    final = report["final"]
    # 60 tiny steps: the start of learning, not a quality bar (that is the benchmark's job)
    assert final["psnr"] > before["psnr"] + 1.0, (before, final)
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    rec = [r["rec"] for r in logs if "rec" in r]
    assert sum(rec[-10:]) < 0.6 * sum(rec[:10])
    assert final["used_codes"] > 4 and report["images_seen"] == 240
    assert (tmp_path / "tokenizer" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 60
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1


def test_dead_codes_are_reseeded_from_encoder_outputs(scenes, tmp_path):
    trainer = TokenizerTrainer(config(scenes, tmp_path), ONE)
    codebook = trainer.model.codebook
    before = codebook.detach().clone()
    trainer.counts.zero_()
    trainer.counts[:10] = 5  # codes 0..9 are alive
    exp_avg = torch.ones_like(codebook)
    trainer.optimizer.state[codebook] = {"exp_avg": exp_avg, "step": torch.tensor(3.0)}
    z = torch.randn(2, 8, 4, 4)
    result = trainer._restart_dead_codes(z)
    assert result == {"window_usage": 10 / 64, "restarted": 54.0}
    assert torch.equal(codebook[:10], before[:10])
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    nearest = torch.cdist(codebook[10:].detach(), flat).min(1).values
    assert (nearest < 0.1 * flat.std()).all()  # each new code sits on an encoder output
    assert (exp_avg[10:] == 0).all() and (exp_avg[:10] == 1).all()
    assert trainer.counts.sum() == 0


def test_batch_plan_is_a_function_of_the_step():
    plan = BatchPlan(10, 4, ONE, seed=3, start=0, stop=5)
    batches = list(plan)
    assert sorted(sum(batches[:2], []) + batches[2][:2]) == list(range(10))  # one epoch each
    late = BatchPlan(10, 4, ONE, seed=3, start=3, stop=5)
    assert list(late) == batches[3:]
    ranks = [BatchPlan(10, 2, World(r, 2, torch.device("cpu")), 3, 0, 1).indices(0) for r in (0, 1)]
    assert ranks[0] + ranks[1] == batches[0]


def test_held_out_split_is_stable(tmp_path):
    files = [tmp_path / f"{i}.png" for i in range(20)]
    train, held = split_held_out(files, tmp_path, 5)
    assert len(held) == 5 and not set(train) & set(held)
    _, held_more = split_held_out(files + [tmp_path / "new.png"], tmp_path, 5)
    assert len(set(held) & set(held_more)) >= 4


def test_balance_by_folder_draws_every_subfolder_equally(tmp_path):
    common = [tmp_path / "segmentation" / "input" / f"{i}.png" for i in range(6)]
    rare = [tmp_path / "pose" / f"{i}.png" for i in range(2)]
    loose = [tmp_path / "x.png"]
    balanced = balance_by_folder(common + rare + loose, tmp_path)
    assert balanced[:6] == common  # the largest folder once, in order
    assert balanced[6:12] == rare * 3 and balanced[12:] == loose * 6
    assert balance_by_folder([], tmp_path) == []


def test_balanced_training_reads_the_rare_folder_as_often(scenes, tmp_path):
    data = tmp_path / "data"
    for i, image in enumerate(sorted(scenes.glob("*.png"))):
        folder = data / ("common" if i < 20 else "rare")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / image.name)
    config = TokenizerTrainConfig(
        data=str(data), out=str(tmp_path / "run"), model=TINY_MODEL, val_images=0,
        balance_folders=True,
    )  # fmt: skip
    files = TokenizerTrainer(config).train_files
    assert len(files) == 40 and sum(f.parent.name == "rare" for f in files) == 20


def test_lr_schedule():
    c = TokenizerTrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(10, c) == pytest.approx(1e-3) and lr_at(100, c) == pytest.approx(1e-4)


def test_bad_training_inputs(scenes, tmp_path):
    with pytest.raises(DelvmError, match="missing: no such folder"):
        TokenizerTrainer(config(tmp_path / "missing", tmp_path / "o"), ONE)
    with pytest.raises(DelvmError, match="leave none to train on"):
        TokenizerTrainer(config(scenes, tmp_path / "o", val_images=24), ONE)
    with pytest.raises(DelvmError, match="precision"):
        TokenizerTrainConfig(precision="fp8")
    with pytest.raises(DelvmError, match="unknown tokenizer preset"):
        recipe("f99")


def test_bad_files_in_the_training_folder_are_skipped(scenes, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(scenes.iterdir())[:12]:
        (data / p.name).write_bytes(p.read_bytes())
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report = TokenizerTrainer(
        config(data, tmp_path / "o", steps=6, batch_size=6, val_images=2), ONE
    ).run()
    assert list(report["skipped"]) == [str(data / "broken.png")]


def test_cli_train_and_resume_message(scenes, tmp_path, capsys):
    args = [
        "tokenizer",
        "train",
        "--data",
        str(scenes),
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--val-images",
        "2",
        "--model",
        "resolution=32",
        "--model",
        "channel_mult=(1, 2)",
        "--model",
        "num_embeddings=32",
        "--no-hflip",
    ]
    assert main(args) == 0
    assert "held-out PSNR" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "tokenizer").num_codes == 32
    assert main([*args[:-1], "--hflip"]) == 2
    assert "written with hflip=False" in capsys.readouterr().err


_DDP_SCRIPT = """
import json, sys, torch
from delvm.tokenizer.train import TokenizerTrainer, recipe
out = sys.argv[1]
config = recipe("cpu-64-f8-1024", data=sys.argv[2], out=out, model=%r, steps=3, batch_size=2,
                val_images=2, restart_every=1, gan_weight=0.5, eval_every=3, checkpoint_every=3)
read, batch = [], TokenizerTrainer._batch
TokenizerTrainer._batch = lambda self, items: read.append([str(i[0]) for i in items]) or batch(
    self, items)
trainer = TokenizerTrainer(config)
trainer.run()
torch.save(trainer.model.state_dict(), f"{out}/rank{trainer.world.rank}.pt")
open(f"{out}/rank{trainer.world.rank}.json", "w").write(json.dumps(read))
"""


@pytest.mark.slow
def test_torchrun_ddp_training_keeps_ranks_in_step(scenes, tmp_path):
    """Two gloo ranks, GAN on, codes re-seeded every step: both ranks end with equal weights."""
    script = tmp_path / "run.py"
    script.write_text(_DDP_SCRIPT % (TINY_MODEL,))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    done = subprocess.run(
        [torchrun, "--nproc_per_node", "2", str(script), str(tmp_path), str(scenes)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    read = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(read[0]) == len(read[1]) == 3
    for first, second in zip(*read, strict=True):  # each step: two different halves of a batch
        assert len(first) == len(second) == 2 and not set(first) & set(second)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    state = torch.load(
        tmp_path / "checkpoints" / "step-000003" / "training_state.pt", weights_only=True
    )
    assert state["world_size"] == 2 and state["counts"].sum() == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images_seen"] == 3 * 2 * 2


# ---- losses and metrics ---------------------------------------------------------------------


def lpips_by_hand(vgg: dict, heads: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Zhang et al. 2018 (the `lpips` package, vgg, v0.1) written out from the two weight files:
    inputs to [-1, 1] and its scaling layer; torchvision's VGG16 `features` by index (convs where
    the file has weights, max-pools at 4, 9, 16, 23, ReLUs between); at relu1_2 ... relu5_3 each
    image's features normalised over channels, squared differences weighed by the head, averaged
    over space, summed over the five layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    x = (torch.cat([a, b]) * 2 - 1 - shift) / scale
    distance = torch.zeros(len(a))
    for i in range(30):
        if f"features.{i}.weight" in vgg:
            x = F.conv2d(x, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)
        elif i in (4, 9, 16, 23):
            x = F.max_pool2d(x, 2)
        else:
            x = F.relu(x)
        if i in (3, 8, 15, 22, 29):
            fa, fb = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in x.chunk(2))
            head = heads[f"lin{(3, 8, 15, 22, 29).index(i)}.model.1.weight"]
            distance += ((fa - fb).pow(2) * head.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return distance


def test_lpips_loads_local_weights_and_measures_distance(vgg_files):
    lpips = LPIPS.from_files(vgg_files)
    vgg, heads = (torch.load(path, weights_only=True) for path in vgg_files)
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    assert torch.allclose(lpips(a, a), torch.zeros(2), atol=1e-6)
    d = lpips(a, b)
    with torch.no_grad():
        assert torch.allclose(d, lpips_by_hand(vgg, heads, a, b), rtol=1e-5)
    d.sum().backward()
    assert b.grad.abs().sum() > 0 and all(p.grad is None for p in lpips.parameters())


def test_lpips_rejects_wrong_files(tmp_path, vgg_files):
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "heads.pth")
    with pytest.raises(DelvmError, match="not VGG16 weights"):
        LPIPS.from_files([tmp_path / "heads.pth"])
    state = torch.load(vgg_files[0], weights_only=True)
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(state, tmp_path / "gray.pth")
    with pytest.raises(DelvmError, match=r"gray.pth: 0.weight is \(64, 1, 3, 3\)"):
        LPIPS.from_files([tmp_path / "gray.pth"])
    with pytest.raises(DelvmError, match="absent.pth: no such weights file"):
        LPIPS.from_files([tmp_path / "absent.pth"])


def test_patch_discriminator_and_hinge_loss():
    disc = PatchDiscriminator(3, width=16, layers=3)
    assert disc(torch.rand(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))


def test_adaptive_weight_balances_gradient_norms():
    layer = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(4)
    rec = (layer @ x).pow(2).sum()
    gan = 3.0 * (layer @ x).sum()
    g_rec = torch.autograd.grad(rec, layer, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(gan, layer, retain_graph=True)[0].norm()
    weight = adaptive_gan_weight(rec, gan, layer)
    assert weight.item() == pytest.approx((g_rec / (g_gan + 1e-4)).item(), rel=1e-5)


def test_psnr_and_usage():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1  # mse 0.01 -> 20 dB
    assert psnr(a, b)[0].item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(a, b)[1].item() == pytest.approx(100.0)
    usage = codebook_usage(torch.tensor([5, 5, 0, 0]))
    assert usage == {"used_codes": 2, "usage": 0.5, "perplexity": pytest.approx(2.0)}


def test_crops_are_windows_of_the_images_and_train(scenes, tmp_path):
    trainer = TokenizerTrainer(config(scenes, tmp_path / "o", crop=16), ONE)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    batch = trainer._batch([(Path(f"{i}.png"), a, None) for i, a in enumerate(arrays)])
    assert batch.shape == (4, 3, 16, 16)
    for crop, array in zip(batch, arrays, strict=True):
        crop = (crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        windows = [
            image[top : top + 16, left : left + 16]
            for image in (array, array[:, ::-1])
            for top in range(17)
            for left in range(17)
        ]
        assert any(np.array_equal(crop, w) for w in windows)
    report = trainer.run()  # crops train; held-out PSNR is still measured on whole images
    assert report["steps"] == 4 and np.isfinite(report["final"]["psnr"])
    for bad in (15, 64):
        with pytest.raises(DelvmError, match=f"crop {bad} must be a multiple of 2"):
            TokenizerTrainer(config(scenes, tmp_path / f"bad{bad}", crop=bad), ONE)
