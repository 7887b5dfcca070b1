"""Classification with the trunk: shapes, loading pretrained trunks, metrics, recipe, resume, input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torchmetrics.functional.classification import multiclass_accuracy
from transformers import LlamaConfig, LlamaForCausalLM

from delvm.classify.data import EvalSamples, ImageFolder, PixelAugment, TrainSamples, to_pixels
from delvm.classify.evaluate import evaluate, topk_correct
from delvm.classify.model import (
    ClassifierConfig,
    VisualClassifier,
    classifier_from_checkpoint,
    load_classifier,
    save_classifier,
)
from delvm.classify.train import (
    ClassifierTrainer,
    ClassifyConfig,
    RecipeSection,
    cutmix,
    mix_batch,
    mixup,
    param_groups,
    soft_cross_entropy,
    soft_targets,
)
from delvm.cli import main
from delvm.data.augment import AugmentConfig
from delvm.errors import DelvmError
from delvm.model.checkpoint import load_model, save_model
from delvm.model.transformer import VisualLM, drop_path, preset
from delvm.train.config import load_config
from delvm.train.distributed import World

CPU = World(rank=0, size=1, device=torch.device("cpu"))


def classifier(block: str = "llama", causal: bool = True, classes: int = 5) -> VisualClassifier:
    torch.manual_seed(0)
    trunk = VisualLM(preset("tiny" if block == "llama" else "tiny-vit"))
    config = ClassifierConfig(num_classes=classes, image_size=32, patch_size=8, causal=causal)
    return VisualClassifier(trunk, config).eval()


def write_folder(root, classes=("a", "b", "c"), per_class=4, size=24):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# ---- the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["llama", "vit"])
def test_shapes_and_causal_or_bidirectional_attention(block):
    model = classifier(block)
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert model(pixels).shape == (2, 5)
        assert model.features(pixels).shape == (2, 64)
        # Change only the last patch (bottom right): with causal attention the first patches'
        # hidden states cannot see it; bidirectionally they all do.
        changed = pixels.clone()
        changed[:, :, -8:, -8:] = torch.rand(2, 3, 8, 8)
        for causal in (True, False):
            embed = [model.patch_embed(x).flatten(2).transpose(1, 2) for x in (pixels, changed)]
            before, after = (model.trunk.hidden_states(e, causal=causal) for e in embed)
            assert torch.equal(before[:, :-1], after[:, :-1]) == causal
            assert not torch.equal(before[:, -1], after[:, -1])
        bidirectional = classifier(block, causal=False)
        assert not torch.allclose(bidirectional(pixels), model(pixels))
    with pytest.raises(DelvmError, match=r"expected \[B, 3, 32, 32\]"):
        model(torch.rand(2, 3, 16, 16))


def test_config_errors_name_the_setting():
    with pytest.raises(DelvmError, match="multiple of"):
        ClassifierConfig(num_classes=3, image_size=30, patch_size=8)
    with pytest.raises(DelvmError, match="max_seq_len 256"):
        VisualClassifier(
            VisualLM(preset("tiny")), ClassifierConfig(3, image_size=256, patch_size=8)
        )
    with pytest.raises(DelvmError, match="at least 2 classes"):
        VisualClassifier(VisualLM(preset("tiny")), ClassifierConfig(1, image_size=32, patch_size=8))


@pytest.mark.parametrize("name", ["tiny", "tiny-vit"])
def test_trunk_weights_equal_the_lvm_checkpoint(tmp_path, name):
    torch.manual_seed(1)
    lvm = VisualLM(preset(name))
    save_model(lvm, tmp_path / "lvm")
    config = ClassifierConfig(num_classes=4, image_size=32, patch_size=8)
    model = classifier_from_checkpoint(tmp_path / "lvm", config)
    trunk = {k: v for k, v in lvm.state_dict().items() if k.startswith(("blocks.", "norm."))}
    loaded = model.trunk.state_dict()
    assert set(loaded) == set(trunk)  # no token embedding, no next-token head
    assert all(torch.equal(loaded[k], trunk[k]) for k in trunk)
    assert {k.split(".")[0] for k in model.state_dict()} == {"patch_embed", "trunk", "head"}


def test_trunk_from_a_hugging_face_llama_folder_computes_what_transformers_does(tmp_path):
    torch.manual_seed(2)
    hf_config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=176,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=256, rms_norm_eps=1e-6,
                            tie_word_embeddings=False)  # fmt: skip
    hf = LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    config = ClassifierConfig(num_classes=4, image_size=32, patch_size=8)
    model = classifier_from_checkpoint(tmp_path / "hf", config).eval()
    reference = load_model(tmp_path / "hf")
    trunk = {k: v for k, v in reference.state_dict().items() if k.startswith(("blocks.", "norm."))}
    assert all(torch.equal(model.trunk.state_dict()[k], v) for k, v in trunk.items())
    # The trunk on patch embeddings is transformers' LlamaModel on the same inputs_embeds.
    embeds = model.patch_embed(torch.rand(2, 3, 32, 32)).flatten(2).transpose(1, 2)
    with torch.no_grad():
        ours = model.trunk.hidden_states(embeds)
        theirs = hf.model(inputs_embeds=embeds).last_hidden_state
    assert (ours - theirs).abs().max() < 1e-5


def test_saved_classifier_loads_back_identically(tmp_path):
    model = classifier("vit", causal=False)
    save_classifier(model.state_dict(), tmp_path / "c", model.trunk.config, model.config,
                    ["a", "b", "c", "d", "e"], {"train": "", "val": ""})  # fmt: skip
    back, meta = load_classifier(tmp_path / "c")
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(pixels), model(pixels))
    assert meta["classes"] == ["a", "b", "c", "d", "e"] and back.config.causal is False
    save_model(VisualLM(preset("tiny")), tmp_path / "lvm")
    with pytest.raises(DelvmError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "lvm")


# ---- metrics and the recipe ---------------------------------------------------------------------


@pytest.mark.parametrize("classes", [10, 3])
def test_topk_against_a_direct_computation_and_torchmetrics(classes):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(200, classes, generator=generator)
    labels = torch.randint(0, classes, (200,), generator=generator)
    hits = topk_correct(logits, labels, (1, 5))
    # Direct: the label's rank is the number of classes scoring higher.
    rank = (logits > logits.gather(1, labels[:, None])).sum(dim=1)
    assert hits == {1: int((rank < 1).sum()), 5: int((rank < 5).sum())}
    for k in (1, 5):
        reference = multiclass_accuracy(logits, labels, classes, top_k=min(k, classes),
                                        average="micro")  # fmt: skip
        assert hits[k] / 200 == pytest.approx(float(reference))
    if classes < 5:
        assert hits[5] == 200


def test_evaluate_equals_a_direct_pass_and_skips_unreadable_files(tmp_path):
    root = write_folder(tmp_path / "val")
    (root / "b" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = ImageFolder(root)
    model = classifier(classes=3)
    with pytest.warns(UserWarning, match=r"skipped .*9\.png: not an image"):
        result = evaluate(model, images, crop=0.875, batch=5, workers=0, world=CPU)
    samples = EvalSamples(images, 32, 0.875)
    with pytest.warns(UserWarning):
        rows = [row for row in (samples[i] for i in range(len(samples))) if row[2]]
    pixels = to_pixels(torch.stack([r[0] for r in rows]), CPU.device)
    labels = torch.tensor([r[1] for r in rows])
    with torch.no_grad():
        logits = model(pixels)
    assert result["images"] == 12 and result["skipped"] == 1
    assert result["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert result["top5"] == 100.0  # 3 classes
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_label_smoothing_and_mixup():
    logits, labels = torch.randn(8, 6), torch.randint(0, 6, (8,))
    targets = soft_targets(labels, 6, 0.1)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    pixels = torch.rand(8, 3, 4, 4)
    off = mix_batch(pixels, labels, targets, RecipeSection(), [0])
    assert off[0] is pixels and off[1] is targets
    mixed, mixed_targets = mix_batch(pixels, labels, targets, RecipeSection(mixup_alpha=0.8), [5])
    draw = np.random.default_rng([5])
    draw.random()  # the mixup_prob draw
    lam = float(draw.beta(0.8, 0.8))
    assert torch.allclose(mixed, lam * pixels + (1 - lam) * pixels.flip(0))
    assert torch.allclose(mixed_targets, lam * targets + (1 - lam) * targets.flip(0))
    direct = mixup(pixels, targets, lam)
    assert torch.equal(direct[0], mixed) and torch.equal(direct[1], mixed_targets)


def test_cutmix_targets_are_the_shares_of_each_image_in_the_pixels():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 1, 0])
    # Image i is the constant i: each output pixel says which image it came from.
    pixels = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 16).contiguous()
    rows = F.one_hot(torch.arange(8), 8).float()  # one "class" per image, to read shares back
    mixed, shares = cutmix(pixels, labels, rows, alpha=1.0)
    counted = torch.stack([(mixed[:, 0] == i).float().mean((1, 2)) for i in range(8)], dim=1)
    assert torch.allclose(shares, counted)
    assert (counted.max(1).values < 1).sum() >= 4  # most images did receive a box
    # With the real targets: the label weights are the areas, label smoothing kept.
    targets = soft_targets(labels, 6, 0.1)
    torch.manual_seed(0)
    _, mixed_targets = cutmix(pixels, labels, targets, alpha=1.0)
    assert torch.allclose(mixed_targets, counted @ targets)


def test_mix_batch_switches_between_mixup_and_cutmix_as_timm():
    pixels, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    targets = soft_targets(labels, 4, 0.0)
    recipe = RecipeSection(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_switch=0.5)
    kinds = []
    for seed in range(40):
        mixed, _ = mix_batch(pixels, labels, targets, recipe, [seed])
        # Mixup blends every pixel; CutMix leaves most pixels exactly one image's.
        exact = (mixed[:, None] == pixels[None]).all(2).any(1).float().mean().item()
        kinds.append("cutmix" if exact > 0.5 else "mixup")
        again, _ = mix_batch(pixels, labels, targets, recipe, [seed])
        assert torch.equal(mixed, again)  # a function of the seed
    assert 10 < kinds.count("cutmix") < 30
    never = RecipeSection(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=0.0)
    assert mix_batch(pixels, labels, targets, never, [1])[0] is pixels


def test_pixel_augment_is_seeded_per_sample_and_erases_a_grey_box():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert PixelAugment()(image, [0, 1]) is image
    randaug = PixelAugment(ops=2, magnitude=9)
    outputs = [randaug(image, [0, k]) for k in range(6)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outputs)
    assert np.array_equal(randaug(image, [0, 3]), outputs[3])
    assert sum(not np.array_equal(o, image) for o in outputs) >= 4
    assert len({o.tobytes() for o in outputs}) >= 4
    erased = PixelAugment(erase_prob=1.0)(image, [0, 0])
    box = (erased != image).any(2)
    assert np.all(erased[box] == 128) and 0.02 * 1024 <= box.sum() <= 0.34 * 1024
    rows, cols = np.nonzero(box)  # one rectangle
    assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].mean() > 0.9


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    dropped = drop_path(x, 0.25, training=True)
    per_sample = dropped.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # all or nothing per sample
    assert sorted(set(per_sample[:, 0].tolist())) == [0.0, pytest.approx(1 / 0.75)]
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert drop_path(x, 0.25, training=False) is x
    model = classifier(classes=3)
    model.set_drop_path(0.1)
    assert [b.drop_path for b in model.trunk.blocks] == [0.0, pytest.approx(0.1)]
    pixels = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        plain = model.features(pixels)
        model.set_drop_path(0.0)
        assert torch.equal(model.features(pixels), plain)  # off in eval
        model.set_drop_path(0.99)
        model.train()
        torch.manual_seed(1)
        assert not torch.allclose(model.features(pixels), plain, atol=1e-2)


def test_position_grid_places_patches_where_the_tokenizer_codes_were():
    config = ClassifierConfig(num_classes=3, image_size=24, patch_size=8, position_grid=4)
    assert config.positions().tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert ClassifierConfig(3, image_size=24, patch_size=8).positions().tolist() == list(range(9))
    with pytest.raises(DelvmError, match="position_grid 2: at least the 3 patches"):
        ClassifierConfig(num_classes=3, image_size=24, patch_size=8, position_grid=2)
    trunk = classifier().trunk
    with torch.no_grad():  # sharper attention than at initialisation, so positions matter
        for block in trunk.blocks:
            block.attn.qkv.weight.mul_(20)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        default = trunk.hidden_states(x)
        assert torch.equal(trunk.hidden_states(x, positions=torch.arange(9)), default)
        shifted = trunk.hidden_states(x, positions=torch.arange(9) + 7)  # rotary is relative
        spread = trunk.hidden_states(x, positions=config.positions())
        assert (shifted - default).abs().max() < 1e-4 < 1e-2 < (spread - default).abs().max()
        model = VisualClassifier(trunk, config).eval()
        pixels = torch.rand(2, 3, 24, 24)
        embed = model.patch_embed((pixels - model.mean) / model.std).flatten(2).transpose(1, 2)
        expected = trunk.hidden_states(embed, positions=config.positions()).mean(1)
        assert torch.allclose(model.features(pixels), expected)


def test_layer_wise_lr_decay_groups():
    model = classifier(classes=3)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(scale) == sum(len(g["params"]) for g in groups) == len(params)
    layers = model.trunk.config.num_layers  # 2
    assert scale[id(params["patch_embed.weight"])] == 0.5 ** (layers + 1)
    assert scale[id(params["trunk.blocks.0.attn.qkv.weight"])] == 0.5**layers
    assert scale[id(params["trunk.blocks.1.mlp.down.weight"])] == 0.5
    assert scale[id(params["head.weight"])] == scale[id(params["trunk.norm.weight"])] == 1.0
    assert decay[id(params["patch_embed.weight"])] == decay[id(params["head.weight"])] == 0.05
    assert decay[id(params["head.bias"])] == decay[id(params["trunk.norm.weight"])] == 0.0


# ---- data ---------------------------------------------------------------------------------------


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DelvmError, match="no such image folder"):
        ImageFolder(tmp_path / "missing")
    write_folder(tmp_path / "set")
    (tmp_path / "set" / "empty").mkdir()
    with pytest.raises(DelvmError, match=r"set/empty: class folder holds no images"):
        ImageFolder(tmp_path / "set")
    write_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DelvmError, match="at least two"):
        ImageFolder(tmp_path / "one")


def test_training_samples_are_deterministic_and_skip_unreadable_files(tmp_path):
    root = write_folder(tmp_path / "train", per_class=2)
    (root / "a" / "0.png").write_bytes(b"")
    images = ImageFolder(root)
    samples = TrainSamples(images, AugmentConfig(size=16, scale=(0.2, 1.0)), seed=4)
    with pytest.warns(UserWarning, match=r"skipped .*a/0\.png: empty file"):
        epoch = [samples[k] for k in range(len(images))]
    assert all(image.shape == (16, 16, 3) and image.dtype == torch.uint8 for image, _ in epoch)
    again = TrainSamples(images, AugmentConfig(size=16, scale=(0.2, 1.0)), seed=4)
    with pytest.warns(UserWarning):
        assert all(torch.equal(again[k][0], epoch[k][0]) for k in reversed(range(len(images))))
    assert not torch.equal(samples[len(images)][0], epoch[0][0])  # the next epoch reshuffles


# ---- training -----------------------------------------------------------------------------------


def tiny_run_overrides() -> list[str]:
    return [
        "steps=4", "batch=6", "workers=0", "checkpoint_every=2",
        "eval_every=2", "log_every=1", "tensorboard=false", "model.preset='tiny'",
        "classifier.image_size=32", "classifier.patch_size=8", "data.toy.resolution=32",
        "data.toy.train=60", "data.toy.val=12", "data.crop_scale=[0.35, 1.0]",
        "optim.lr=3e-3", "optim.warmup_ratio=0.25", "recipe.mixup_alpha=0.8",
        "recipe.cutmix_alpha=1.0", "recipe.randaug_ops=2", "recipe.erase_prob=0.25",
        "recipe.drop_path=0.1", "precision='fp32'",  # "auto" is bf16 on CPUs with bf16 units
    ]  # fmt: skip


def tiny_run(out, *overrides) -> ClassifyConfig:
    settings = [f"out={str(out)!r}", *tiny_run_overrides(), *overrides]
    return load_config(None, settings, schema=ClassifyConfig)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    config = tiny_run(tmp_path / "run")
    result = ClassifierTrainer(config).run()
    assert set(result) == {"top1", "top5", "loss", "images", "skipped"}
    final = tmp_path / "run" / "checkpoints" / "step-000004"
    uninterrupted = load_file(final / "model.safetensors")
    shutil.rmtree(final)  # as if the run had died after its step-2 checkpoint
    resumed = tiny_run(tmp_path / "run", "workers=1")  # loader workers do not change the data
    assert ClassifierTrainer(resumed).run() == result
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 3, 4]  # on from step 2
    weights = load_file(final / "model.safetensors")
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in uninterrupted)
    with pytest.raises(DelvmError, match="different 'batch' setting"):
        ClassifierTrainer(tiny_run(tmp_path / "run", "batch=4")).run()


def test_pretrained_trunk_is_where_training_starts(tmp_path):
    torch.manual_seed(5)
    lvm = VisualLM(preset("tiny-vit"))
    save_model(lvm, tmp_path / "lvm")
    trainer = ClassifierTrainer(tiny_run(tmp_path / "run", f"init_from={str(tmp_path / 'lvm')!r}"))
    assert trainer.bare.trunk.config.block == "vit"
    assert torch.equal(trainer.bare.trunk.blocks[1].mlp.fc1.weight, lvm.blocks[1].mlp.fc1.weight)


def test_cli_toyset_train_eval_and_errors(tmp_path, capsys):
    assert main(["classify", "toyset", str(tmp_path / "toy"), "--train", "12", "--val", "6",
                 "--resolution", "32"]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "toy" / "train").iterdir())[:2] == [
        "derain-input",
        "derain-target",
    ]
    config = tmp_path / "c.toml"
    config.write_text(
        f'out = "{tmp_path / "run"}"\nsteps = 2\nbatch = 4\nworkers = 0\ntensorboard = false\n'
        f"[classifier]\nimage_size = 32\npatch_size = 8\n"
        f'[data]\ntrain = "{tmp_path / "toy" / "train"}"\nval = "{tmp_path / "toy" / "val"}"\n'
    )
    assert main(["classify", "train", str(config)]) == 0
    assert main(["classify", "eval", str(tmp_path / "run"), "--workers", "0",
                 "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "step-000002: top-1" in printed and "(6 images, 0 unreadable skipped)" in printed
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 6
    capsys.readouterr()
    assert main(["classify", "train", str(config), f"data.train={str(tmp_path / 'nope')!r}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("delvm: error: ") and "nope: no such image folder" in error
    assert len(error.strip().splitlines()) == 1
    assert main(["classify", "eval", str(tmp_path), "--workers", "0"]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    # Mixing and drop path draw per rank; the per-image augmentations are a function of the
    # sample alone, so they stay on.
    settings = ["steps=3", "eval_every=3", "checkpoint_every=3", "recipe.mixup_alpha=0.0",
                "recipe.cutmix_alpha=0.0", "recipe.drop_path=0.0"]  # fmt: skip
    ClassifierTrainer(tiny_run(tmp_path / "one", *settings)).run()
    config = tmp_path / "c.toml"
    config.write_text(f'out = "{tmp_path / "two"}"\n')
    overrides = [o for o in tiny_run_overrides() + settings if not o.startswith("out=")]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "delvm.cli",
        "classify",
        "train",
        str(config),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = "checkpoints/step-000003/model.safetensors"
    one, two = load_file(tmp_path / "one" / final), load_file(tmp_path / "two" / final)
    # One process: 6 rows. Two ranks: 3 rows each of the same 6 -> the same averaged gradient.
    assert all(torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4) for k in one)
