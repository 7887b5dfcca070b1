"""External validation sets (`data.val_stores`): a task validated on a store of its own, as the
paper validates pose on MPII and deraining on Test2800; the sampler, `delvm eval` and training's
periodic evaluation."""

import inspect
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from delvm.cli import main
from delvm.data.example import Example, Skipped
from delvm.data.render import COCO_JOINTS, render_skeleton
from delvm.data.sampler import SamplerConfig, SentenceSampler, open_val_stores
from delvm.data.sources import SOURCES, open_source
from delvm.data.sources.mpii import iter_mpii
from delvm.data.store import TaskArrays, load_build_config, open_store, write_store
from delvm.errors import DelvmError
from delvm.model.checkpoint import save_model
from delvm.model.transformer import VisualLM, preset
from delvm.train.cli import open_sentences
from delvm.train.config import load_config
from delvm.train.trainer import Trainer

TOKENS = 4  # tokens per image (a 2 x 2 grid)
CODES = 64
IDENTITY = {"fingerprint": "0" * 16, "num_codes": CODES, "grid_size": 2, "path": ""}
SEQ = 32  # 4 examples of 2 images of 4 tokens
CONSTANT = 7  # every code of the validation store's pose examples


def labelled(first: int, examples: int) -> TaskArrays:
    """Example o's codes are first + o (mod CODES) in every slot: a sentence says its origins."""
    codes = (first + np.arange(examples)) % CODES
    tokens = np.broadcast_to(codes[:, None, None], (examples, 2, TOKENS)).copy()
    return TaskArrays(
        tokens, np.array([(o, 0) for o in range(examples)]), [f"e{o}" for o in range(examples)]
    )


def constant(examples: int) -> TaskArrays:
    tokens = np.full((examples, 2, TOKENS), CONSTANT)
    return TaskArrays(
        tokens, np.array([(o, 0) for o in range(examples)]), [f"v{o}" for o in range(examples)]
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    write_store(root / "train", {"seg": labelled(0, 20), "pose": labelled(30, 20)}, IDENTITY)
    write_store(root / "mpii", {"pose": constant(3)}, IDENTITY)
    return root


def sampler(stores, val_stores=None, **settings):
    config = SamplerConfig(seq_len=SEQ, balance="none", val_fraction=0.2, **settings)
    return SentenceSampler(open_store(stores / "train"), config, None, val_stores)


def origins(batch, first: int) -> set[int]:
    return {int(code) - first for code in batch.ids.unique()}


def test_a_task_with_a_validation_store_trains_on_all_its_examples_and_validates_there(stores):
    split = sampler(stores)
    own = sampler(stores, open_val_stores({"pose": str(stores / "mpii")}, None))
    assert len(split.train["pose"].origins) == 16 and len(own.train["pose"].origins) == 20
    assert own.train["seg"].origins.tolist() == split.train["seg"].origins.tolist()
    val = {task: [] for task in own.tasks}
    for batch in own.val_batches(4):
        for row, task in zip(batch.ids, batch.tasks, strict=True):
            val[task].append(row)
    assert all(torch.all(row == CONSTANT) for row in val["pose"]) and len(val["pose"]) == 16
    held_out = set(split.split("seg")[1].tolist())
    assert {int(c) for row in val["seg"] for c in row.unique()} <= held_out  # seg: its split
    assert own.val_source("pose") == str(stores / "mpii")
    assert own.val_source("seg") == f"0.2 of {stores / 'train'}"
    drawn = set()
    for step in range(30):
        batch = own.train_batch(step, 0, range(8), ["pose"])
        drawn |= origins(batch, 30)
    assert drawn == set(range(20))  # no pose example is held out any more


def test_validation_stores_must_fit_the_training_store(stores, tmp_path):
    write_store(tmp_path / "other", {"pose": constant(2)}, {**IDENTITY, "fingerprint": "1" * 16})
    write_store(tmp_path / "clips", {"pose": TaskArrays(np.zeros((2, 3, TOKENS), int),
                np.array([(0, 0), (1, 0)]), ["a", "b"])}, IDENTITY)  # fmt: skip
    cases = {
        "derain": (stores / "mpii", "'derain' is not a task of the training store"),
        "seg": (stores / "mpii", "that store holds no task 'seg' (pose); build it with task"),
        "pose": (tmp_path / "other", "tokenized with another tokenizer"),
    }
    for task, (path, message) in cases.items():
        with pytest.raises(DelvmError, match=rf"data.val_stores.{task} = .*{re.escape(message)}"):
            sampler(stores, {task: open_store(path)})
    with pytest.raises(DelvmError, match="3 images per example, the training store's pose has 2"):
        sampler(stores, {"pose": open_store(tmp_path / "clips")})


def test_a_run_names_its_validation_stores_in_its_data_section(stores):
    mpii = str(stores / "mpii")
    settings = [f"data.store={str(stores / 'train')!r}", f"data.seq_len={SEQ}",
                "data.balance='none'", f"data.val_stores={{'pose': {mpii!r}}}"]  # fmt: skip
    config = load_config(None, settings)
    assert config.data.val_stores == {"pose": str(stores / "mpii")}
    assert open_sentences(config).val_source("pose") == str(stores / "mpii")  # `delvm train`
    val_stores = open_val_stores({"pose": str(stores / "mpii"), "seg": str(stores / "mpii")}, None)
    assert val_stores["pose"] is val_stores["seg"]  # one store opened once
    with pytest.raises(DelvmError, match="built with tokenizer 0000000000000000, but this run"):
        open_val_stores({"pose": str(stores / "mpii")}, "1" * 16)


def by_hand_loss(model: VisualLM) -> float:
    """The loss of every validation-store pose sentence: all of them are CONSTANT codes."""
    ids = torch.full((1, SEQ), CONSTANT)
    with torch.no_grad():
        logits = model(ids[:, :-1])
    return F.cross_entropy(logits[0], ids[0, 1:]).item()


def test_eval_measures_a_task_on_its_validation_store(stores, tmp_path, capsys):
    torch.manual_seed(0)
    model = VisualLM(preset("tiny", vocab_size=CODES, codebook_dim=16, max_seq_len=SEQ)).eval()
    save_model(model, tmp_path / "ckpt", tokenizer_fingerprint=IDENTITY["fingerprint"])
    args = ["eval", str(tmp_path / "ckpt"), "--store", str(stores / "train"), "--seq-len", str(SEQ),
            "--val-fraction", "0.2", "--device", "cpu"]  # fmt: skip
    assert (
        main([*args, "--val-store", f"pose={stores / 'mpii'}", "--out", str(tmp_path / "e")]) == 0
    )
    assert f"pose: {stores / 'mpii'}" in capsys.readouterr().out
    result = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert result["pose"]["sentence"]["loss"] == pytest.approx(by_hand_loss(model), rel=1e-5)
    assert main([*args, "--out", str(tmp_path / "split")]) == 0
    split = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert split["seg"] == result["seg"] and split["pose"] != result["pose"]
    assert main([*args, "--val-store", "pose"]) == 2
    assert "--val-store 'pose': expected TASK=STORE" in capsys.readouterr().err


def test_training_evaluates_each_task_on_its_validation_store(stores, tmp_path):
    settings = [f"out={str(tmp_path / 'run')!r}", "steps=2", "micro_batch=2", "eval_every=2",
                "checkpoint_every=2", "tensorboard=false", f"data.seq_len={SEQ}",
                "model.preset='tiny'", "precision='fp32'"]  # fmt: skip
    config = load_config(None, settings)
    val_stores = open_val_stores({"pose": str(stores / "mpii")}, None)
    codebook = torch.randn(CODES, 16, generator=torch.Generator().manual_seed(0))
    source = SentenceSampler(open_store(stores / "train"),
                             SamplerConfig(seq_len=SEQ, balance="none", val_fraction=0.2),
                             codebook, val_stores)  # fmt: skip
    trainer = Trainer(config, source)
    trainer.run()
    logged = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    (last,) = [record["val"] for record in logged if "val" in record]
    assert last["pose"]["sentence"]["loss"] == pytest.approx(by_hand_loss(trainer.model), rel=1e-5)
    assert set(last) == {"pose", "seg"}


# ---- the paper's validation sets: MPII (its JSON form) and Test2800 (paired folders) ----------


def write_mpii(root):
    """Two images in MPII's HRNet / mmpose JSON (1-based joints): two persons, one person, plus
    a malformed record and a person whose image is missing."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
            root / "images" / name
        )
    joints = [[10 + 2 * j + 1, 5 + j + 1] for j in range(16)]  # joint j at (10 + 2j, 5 + j)
    vis = [1] * 16
    vis[5] = 0  # left ankle not labelled
    records = [
        {"image": "a.jpg", "joints": joints, "joints_vis": vis, "center": [41, 31], "scale": 0.2},
        {"image": "a.jpg", "joints": [[x + 30, y] for x, y in joints], "joints_vis": [1] * 16,
         "center": [71, 31], "scale": 0.2},
        {"image": "b.jpg", "joints": joints, "joints_vis": [1] * 16, "center": [41, 31],
         "scale": 0.25},
        {"image": "a.jpg", "joints": [[1, 2]], "joints_vis": [1], "center": [1, 1], "scale": 1},
        {"image": "gone.jpg", "joints": joints, "joints_vis": vis, "center": [41, 31],
         "scale": 0.2},
    ]  # fmt: skip
    (root / "valid.json").write_text(json.dumps(records))
    return root


def test_mpii_joints_become_coco_keypoints_drawn_as_the_coco_source_draws_them(tmp_path):
    root = write_mpii(tmp_path / "mpii")
    items = list(open_source({"format": "mpii", "json_path": str(root / "valid.json"),
                              "image_dir": str(root / "images")}))  # fmt: skip
    examples = [i for i in items if isinstance(i, Example)]
    reasons = sorted(i.reason.split(" (")[0] for i in items if isinstance(i, Skipped))
    assert reasons == ["no such file", "not an MPII record"]
    a, b = examples
    assert a.keypoints.shape == (2, 17, 3) and b.keypoints.shape == (1, 17, 3)
    # By hand: MPII joint j sits at (10 + 2j, 5 + j) once 0-based; 0 r ankle, 10 r wrist,
    # 13 l shoulder, 5 l ankle (unlabelled here); COCO's face joints stay empty.
    at = {name: a.keypoints[0, COCO_JOINTS.index(name)].tolist() for name in COCO_JOINTS}
    assert at["right_ankle"] == [10, 5, 2] and at["right_wrist"] == [30, 15, 2]
    assert at["left_shoulder"] == [36, 18, 2] and at["left_ankle"] == [0, 0, 0]
    assert all(at[name] == [0, 0, 0] for name in COCO_JOINTS[:5])
    assert a.keypoints[1, COCO_JOINTS.index("right_ankle")].tolist() == [40, 5, 2]
    np.testing.assert_array_equal(a.images[1], render_skeleton(a.keypoints, 60, 80))
    assert a.meta["skeleton"] == 1 and a.meta["nearest"] == [False, True]

    # One square crop per person: MPII's scale x 200 px (the person's height) x box_scale.
    crops = list(iter_mpii(root / "valid.json", root / "images", per_person=True))
    first = next(i for i in crops if isinstance(i, Example))
    # Centre (40, 30) once 0-based, side 0.2 x 200 x 1.25 = 50: the crop starts at (15, 5).
    assert first.images[0].shape == (50, 50, 3) and first.meta["box"] == [15, 5, 50]
    moved = {name: first.keypoints[0, COCO_JOINTS.index(name)].tolist() for name in COCO_JOINTS}
    assert moved["right_wrist"] == [15, 10, 2]  # (30, 15) in the photo
    assert moved["right_ankle"] == [0, 0, 0]  # (10, 5): left of the crop, so left out


def test_mpii_and_the_paper_val_config_errors(tmp_path):
    root = write_mpii(tmp_path / "mpii")
    with pytest.raises(DelvmError, match="nowhere: no such image folder .MPII source"):
        iter_mpii(root / "valid.json", root / "nowhere")
    (root / "coco.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DelvmError, match="coco.json: not MPII annotations"):
        iter_mpii(root / "coco.json", root / "images")
    config = load_build_config("data/paper_val", tokenizer="tok")
    assert config.balance == "none" and [s["task"] for s in config.sources] == ["pose", "derain"]
    for spec in config.sources:
        kwargs = {k: v for k, v in spec.items() if k != "format"}
        inspect.signature(SOURCES[spec["format"]]).bind(**kwargs)
