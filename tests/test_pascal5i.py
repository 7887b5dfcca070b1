"""`delvm eval-pascal5i` on a small Pascal VOC layout the tests write: oracle, all-black and
all-foreground predictors give the values computed by hand; the CLI runs end to end on a tiny
checkpoint."""

import json

import numpy as np
import pytest
from PIL import Image

from delvm.cli import build_parser, main
from delvm.errors import DelvmError
from delvm.evaluation.pascal5i import evaluate_pascal5i, markdown_table
from delvm.model.checkpoint import save_model
from tests.support.tiny import tiny_tokenizer_and_model

SIZE = 64  # the fixture's images are square at this size: the centre crop keeps every pixel
PALETTE = list(np.random.default_rng(1).integers(0, 256, 768))
# Image -> [(class id, rows, cols)] of its objects; 255 is VOC's "void" boundary.
OBJECTS = {
    "a": [(1, slice(8, 24), slice(8, 40)), (15, slice(40, 60), slice(0, 20))],  # 512 px of class 1
    "b": [(1, slice(32, 48), slice(16, 48)), (255, slice(31, 32), slice(16, 48))],  # 512 px
    "c": [(2, slice(0, 32), slice(0, 32))],  # 1024 px
    "d": [(2, slice(40, 64), slice(40, 64)), (1, slice(0, 8), slice(0, 64))],  # 576 px, 512 px
    "e": [(3, slice(10, 20), slice(10, 20))],  # the only image of class 3: no support to draw
    "f": [(7, slice(0, 16), slice(0, 64))],  # fold 1 (classes 6..10)
    "g": [(7, slice(16, 64), slice(0, 64))],
}


def write_voc(root):
    """JPEGImages, palette-PNG SegmentationClass, the VOC val list and HSNet-style fold lists."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "lists"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, objects in OBJECTS.items():
        labels = np.zeros((SIZE, SIZE), np.uint8)
        for class_id, rows, cols in objects:
            labels[rows, cols] = class_id
        photo = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(photo).save(root / "JPEGImages" / f"{name}.jpg")
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette(PALETTE)
        mask.save(root / "SegmentationClass" / f"{name}.png")
    names = [*OBJECTS, "missing"]  # "missing" has no files: skipped, with the reason printed
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(names) + "\n")
    fold0 = ["a__1", "b__1", "d__1", "c__2", "d__2", "e__3", "a__15"]  # a__15: not a fold-0 class
    (root / "lists" / "fold0.txt").write_text("\n".join(fold0) + "\n")
    (root / "lists" / "fold1.txt").write_text("f__7\ng__7\n")
    return root


@pytest.fixture
def voc(tmp_path):
    return write_voc(tmp_path / "voc")


def truth_of(voc_root):
    """Answers each query with its true mask; the query's class is the one its support shows."""
    photos, labels = {}, {}
    for name in OBJECTS:
        photos[name] = np.asarray(
            Image.open(voc_root / "JPEGImages" / f"{name}.jpg").convert("RGB")
        )
        labels[name] = np.asarray(Image.open(voc_root / "SegmentationClass" / f"{name}.png"))

    def name_of(photo):
        return next(name for name, known in photos.items() if np.array_equal(known, photo))

    def predict(pairs, queries):
        support, support_mask = pairs[0]
        shown = labels[name_of(support)][support_mask.max(axis=2) > 127]
        class_id = np.bincount(shown).argmax()
        masks = [labels[name_of(query)] == class_id for query in queries]
        return [np.repeat(m[..., None], 3, axis=2).astype(np.uint8) * 255 for m in masks]

    return predict


def constant(value):
    return lambda pairs, queries: [np.full_like(q, value) for q in queries]


def test_oracle_scores_one_and_trivial_predictors_the_hand_computed_values(voc):
    best = evaluate_pascal5i(truth_of(voc), voc, SIZE, folds=[0])
    fold = best["folds"]["0"]
    assert fold["query_miou"] == 1.0 and fold["miou"] == 1.0
    assert fold["queries"] == 5  # a, b, d for aeroplane; c, d for bicycle; e left out
    assert fold["left_out"] == {"only query of its class (no support to draw)": 1}
    assert fold["skipped"] == 1  # "missing": no mask file
    assert sorted(fold["per_class"]) == ["aeroplane", "bicycle"]

    black = evaluate_pascal5i(constant(0), voc, SIZE, folds=[0])["folds"]["0"]
    assert black["query_miou"] == 0.0 and black["miou"] == 0.0

    # All foreground: each query's IoU is its object's share of the 64 x 64 image.
    white = evaluate_pascal5i(constant(255), voc, SIZE, folds=[0])["folds"]["0"]
    areas = {"aeroplane": [512, 512, 512], "bicycle": [1024, 576]}
    assert white["query_miou"] == pytest.approx((512 * 3 + 1024 + 576) / 5 / 4096)  # 0.153125
    per_class = {name: sum(a) / (4096 * len(a)) for name, a in areas.items()}
    assert white["per_class"] == pytest.approx(per_class)  # 0.125, 0.1953125
    assert white["miou"] == pytest.approx((0.125 + 0.1953125) / 2)  # 0.16015625
    assert white["query_miou"] == white["baseline_foreground_query_miou"]
    assert white["miou"] == white["baseline_foreground_miou"]


def test_threshold_is_a_share_of_white_on_the_channel_mean(voc):
    # The oracle's masks in grey 100 (channel mean 0.39 of white): foreground below 0.39 only.
    oracle = truth_of(voc)

    def grey(pairs, queries):
        return [np.where(m > 0, np.uint8(100), np.uint8(0)) for m in oracle(pairs, queries)]

    assert evaluate_pascal5i(grey, voc, SIZE, folds=[0])["folds"]["0"]["query_miou"] == 0.0
    low = evaluate_pascal5i(grey, voc, SIZE, folds=[0], threshold=0.35)
    assert low["folds"]["0"]["query_miou"] == 1.0 and low["protocol"]["threshold"] == 0.35
    with pytest.raises(DelvmError, match="--threshold 1.5"):
        evaluate_pascal5i(grey, voc, SIZE, folds=[0], threshold=1.5)


def test_fold_lists_and_the_mean_over_folds(voc):
    from_lists = evaluate_pascal5i(truth_of(voc), voc, SIZE, folds=[0, 1], fold_lists=voc / "lists")
    assert from_lists["folds"]["0"]["queries"] == 5 and from_lists["folds"]["1"]["queries"] == 2
    assert from_lists["folds"]["0"]["skipped"] == 1  # a__15: class 15 is not in fold 0
    white = evaluate_pascal5i(constant(255), voc, SIZE, folds=[0, 1], fold_lists=voc / "lists")
    fold1 = (1024 / 4096 + 3072 / 4096) / 2
    assert white["folds"]["1"]["query_miou"] == pytest.approx(fold1)
    assert white["folds"]["1"]["miou"] == pytest.approx(4096 / 8192)
    assert white["mean"]["query_miou"] == pytest.approx((0.153125 + fold1) / 2)
    assert white["mean"]["miou"] == pytest.approx((0.16015625 + 0.5) / 2)
    table = markdown_table(white)
    assert "| mean | 7 | 0.3266 | 0.3301 |" in table and "mIoU per query (Bar et al.)" in table
    (voc / "lists" / "fold0.txt").write_text("a__1\nb__aeroplane\n")
    with pytest.raises(DelvmError, match="fold0.txt:2: 'b__aeroplane': expected NAME__CLASS"):
        evaluate_pascal5i(constant(0), voc, SIZE, folds=[0], fold_lists=voc / "lists")


def test_supports_are_the_query_class_drawn_with_the_seed(voc):
    drawn = []

    def record(pairs, queries):
        drawn.append([pair[0].tobytes() for pair in pairs])
        return [np.zeros_like(q) for q in queries]

    for seed in (0, 0, 1):
        evaluate_pascal5i(record, voc, SIZE, folds=[0], shots=2, seed=seed)
    first, again, other = drawn[:5], drawn[5:10], drawn[10:]
    assert first == again and first != other
    assert all(len(supports) == 2 for supports in first[:3])  # aeroplane: 2 others to draw from
    assert all(len(supports) == 1 for supports in first[3:])  # bicycle: one other image


def test_cli_end_to_end_on_a_tiny_checkpoint(voc, tmp_path, capsys):
    tokenizer, model = tiny_tokenizer_and_model()
    tokenizer.save_pretrained(tmp_path / "tok")
    # A run folder: its latest checkpoint is the one scored.
    step = tmp_path / "run" / "checkpoints" / "step-000002"
    save_model(model, step, tokenizer_fingerprint=tokenizer.fingerprint())
    (step / "training_state.pt").write_bytes(b"")  # finished checkpoints have one
    args = ["eval-pascal5i", str(tmp_path / "run"), "--tokenizer", str(tmp_path / "tok"),
            "--voc", str(voc), "--fold", "1", "--fold-lists", str(voc / "lists"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert build_parser().parse_args(args).device == "auto"  # the GPU when there is one
    assert main([*args, "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "out" / "pascal5i.json").read_text())
    assert result["protocol"] == {"shots": 1, "threshold": 0.5, "seed": 0, "size": 32}
    fold = result["folds"]["1"]
    assert fold["queries"] == 2 and 0.0 <= fold["query_miou"] <= 1.0 and 0.0 <= fold["miou"] <= 1.0
    assert result["mean"]["query_miou"] == fold["query_miou"]
    table = (tmp_path / "out" / "pascal5i.md").read_text()
    assert table.startswith("| fold | queries | mIoU per query (Bar et al.)") and table in (
        capsys.readouterr().out + "\n"
    )

    assert main([*args[:5], str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("delvm: error: ") and "nowhere/JPEGImages: missing" in last
