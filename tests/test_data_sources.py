"""Data sources on small files written here in each real format, good and bad."""

import json
import struct
import zlib

import av
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from delvm.data.example import Example, Skipped
from delvm.data.render import decode_skeleton, render_instances, render_skeleton
from delvm.data.sources import (
    SOURCES,
    iter_coco_keypoints,
    iter_image_folder,
    iter_paired_folders,
    iter_pascal5i,
    iter_sa1b,
    iter_video,
    open_source,
)
from delvm.data.sources.common import example_seed
from delvm.data.sources.sa1b import rle_runs
from delvm.errors import DelvmError


def photo(height=40, width=60, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG declaring width x height with almost no pixel data: a cheap decompression bomb
    (Pillow reads the size from the header alone)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


# Files every image-reading source must either keep (converted to RGB) or skip with a reason.
def write_odd_images(folder, stems=None) -> tuple[set[str], dict[str, str]]:
    """Write one file of each awkward kind; return (stems that must load, stem -> skip reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (60, 40), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 60), 40000, np.uint16)).save(folder / "deep16.png")
    Image.new("RGBA", (60, 40), (255, 0, 0, 128)).save(folder / "rgba.png")
    Image.new("L", (60, 40), 77).save(folder / "gray.png")
    Image.new("P", (60, 40), 3).save(folder / "palette.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    Image.fromarray(photo(200, 200)).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "text.jpg").write_text("this is not an image\n")
    Image.new("1", (8200, 8000)).save(folder / "huge.png")  # 65.6 MP: over the bomb limit
    (folder / "warned.png").write_bytes(png_header(10_000, 10_000))  # Pillow only warns
    (folder / "bomb.png").write_bytes(png_header(20_000, 20_000))  # Pillow raises its own error
    good = {"cmyk", "deep16", "rgba", "gray", "palette"}
    bad = {
        "empty": "empty",
        "corrupt": "not an image",
        "truncated": "truncated",
        "text": "not an image",
        "huge": "pixel limit",
        "warned": "pixel limit",
        "bomb": "pixel limit",
    }
    return good, bad


def split(items) -> tuple[list[Example], list[Skipped]]:
    items = list(items)
    examples = [i for i in items if isinstance(i, Example)]
    skipped = [i for i in items if isinstance(i, Skipped)]
    assert len(examples) + len(skipped) == len(items)
    return examples, skipped


def check_skips(skipped: list[Skipped], expected: dict[str, str]) -> None:
    """Each expected stem skipped once, with its reason; nothing else skipped."""
    by_stem = {}
    for item in skipped:
        stem = item.source.rsplit("/", 1)[-1].split(".")[0]
        assert stem not in by_stem, f"{stem} skipped twice"
        by_stem[stem] = item.reason
        assert "\n" not in item.reason
    assert set(by_stem) == set(expected), by_stem
    for stem, words in expected.items():
        assert words in by_stem[stem], (stem, by_stem[stem])


# --- paired folders ----------------------------------------------------------------------------


def test_paired_rain13k_layout_keeps_every_good_pair_and_reports_the_rest(tmp_path):
    root = tmp_path / "Rain13K"
    good, bad = write_odd_images(root / "input")
    for stem in good | set(bad):
        save(root / "target" / f"{stem}.png", photo(40, 60, seed=1))
    save(root / "input" / "pair.png", photo(40, 60))
    save(root / "target" / "pair.jpg", photo(40, 60, seed=2))  # suffixes may differ
    save(root / "input" / "lonely_input.png", photo())
    save(root / "target" / "lonely_target.png", photo())
    save(root / "input" / "sizes.png", photo(40, 60))
    save(root / "target" / "sizes.png", photo(30, 60))
    save(root / "input" / "twice.png", photo())
    save(root / "input" / "twice.jpg", photo())
    save(root / "target" / "twice.png", photo())

    examples, skipped = split(iter_paired_folders(root, task="derain"))
    assert {e.source.rsplit("/", 1)[-1].split(".")[0] for e in examples} == good | {"pair"}
    for e in examples:
        assert e.task == "derain" and len(e.images) == 2
        assert all(i.dtype == np.uint8 and i.shape == (40, 60, 3) for i in e.images)
        assert e.meta["nearest"] == [False, False]
    pair = next(e for e in examples if e.source.endswith("/pair.png"))
    np.testing.assert_array_equal(pair.images[0], photo(40, 60))
    check_skips(
        skipped,
        bad
        | {
            "lonely_input": "no matching target",
            "lonely_target": "no matching input",
            "sizes": "same size",
            "twice": "several files",
        },
    )


def test_paired_gopro_layout_with_sequence_folders(tmp_path):
    for sequence in ("GOPR0372_07_00", "GOPR0374_11_00"):
        for frame in ("000047", "000048"):
            save(tmp_path / "train" / sequence / "blur" / f"{frame}.png", photo(seed=1))
            save(tmp_path / "train" / sequence / "sharp" / f"{frame}.png", photo(seed=2))
    examples, skipped = split(
        SOURCES["paired"](root=tmp_path, task="deblur", input_dir="blur", target_dir="sharp")
    )
    assert len(examples) == 4 and not skipped
    assert examples[0].source.endswith("GOPR0372_07_00/blur/000047.png")


def test_paired_whole_source_errors(tmp_path):
    with pytest.raises(DelvmError, match="no such folder"):
        list(iter_paired_folders(tmp_path / "missing"))
    (tmp_path / "photos").mkdir()
    with pytest.raises(DelvmError, match="input_dir/target_dir"):
        list(iter_paired_folders(tmp_path))


# --- COCO keypoints ----------------------------------------------------------------------------


def coco_person(x0: float, y0: float, scale: float) -> list[float]:
    """A standing person's 17 (x, y, v) triples, flattened as COCO stores them."""
    layout = [(0, -3.4), (0.25, -3.6), (-0.25, -3.6), (0.5, -3.45), (-0.5, -3.45), (0.9, -2.4),
              (-0.9, -2.4), (1.2, -1.2), (-1.2, -1.2), (1.3, 0), (-1.3, 0), (0.6, 0), (-0.6, 0),
              (0.6, 1.8), (-0.6, 1.8), (0.6, 3.6), (-0.6, 3.6)]  # fmt: skip
    return [v for dx, dy in layout for v in (x0 + dx * scale, y0 + dy * scale, 2)]


def coco_file(tmp_path, annotations, images, categories=None):
    data = {
        "images": images,
        "annotations": annotations,
        "categories": categories
        if categories is not None
        else [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(17)]}],
    }
    path = tmp_path / "person_keypoints_val2017.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_keypoints_per_image_and_per_person(tmp_path):
    images_dir = tmp_path / "val2017"
    save(images_dir / "000000000001.jpg", photo(120, 160))
    save(images_dir / "000000000002.jpg", photo(120, 160))
    (images_dir / "000000000003.jpg").write_bytes(b"")
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "height": 120, "width": 160},
        {"id": 2, "file_name": "000000000002.jpg", "height": 100, "width": 160},  # wrong size
        {"id": 3, "file_name": "000000000003.jpg", "height": 120, "width": 160},
        {"id": 4, "file_name": "000000000004.jpg"},  # no persons: not an example, no error
        {"id": 5},  # malformed
    ]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "keypoints": coco_person(50, 60, 12),
         "bbox": [30, 10, 40, 100], "num_keypoints": 17},
        {"id": 11, "image_id": 1, "category_id": 1, "keypoints": coco_person(115, 60, 12)},
        {"id": 12, "image_id": 1, "category_id": 1, "keypoints": [0] * 51, "iscrowd": 1},
        {"id": 13, "image_id": 2, "category_id": 1, "keypoints": coco_person(50, 60, 12)},
        {"id": 14, "image_id": 3, "category_id": 1, "keypoints": coco_person(50, 60, 12)},
        {"id": 15, "image_id": 1, "category_id": 1},  # no keypoints
        {"id": 16, "image_id": 1, "category_id": 1, "keypoints": [1, 2, 3]},
        {"id": 17, "image_id": 99, "category_id": 1, "keypoints": coco_person(50, 60, 12)},
        {"id": 18, "image_id": [1], "category_id": 1, "keypoints": coco_person(50, 60, 12)},
    ]  # fmt: skip
    path = coco_file(tmp_path, annotations, images)

    examples, skipped = split(iter_coco_keypoints(path, images_dir))
    assert len(examples) == 1
    (example,) = examples
    assert example.keypoints.shape == (2, 17, 3) and example.meta["skeleton"] == 1
    np.testing.assert_array_equal(example.images[1], render_skeleton(example.keypoints, 120, 160))
    reasons = {s.source.rsplit("/", 1)[-1]: s.reason for s in skipped}
    assert "without 'image_id' or 'keypoints'" in reasons["person_keypoints_val2017.json#annotation=15"]  # fmt: skip
    assert "17 (x, y, v)" in reasons["person_keypoints_val2017.json#annotation=16"]
    assert "the JSON says 160x100" in reasons["000000000002.jpg"]
    assert "empty" in reasons["000000000003.jpg"]
    assert "without 'id'" in reasons["person_keypoints_val2017.json#image=4"]
    assert "image_id 99 is not in the file's 'images'" in reasons["person_keypoints_val2017.json#annotation=17"]  # fmt: skip
    assert "not a number or string" in reasons["person_keypoints_val2017.json#annotation=18"]
    assert len(skipped) == 7

    people, _ = split(iter_coco_keypoints(path, images_dir, per_person=True))
    assert [p.source.rsplit("#", 1)[1] for p in people] == ["person=10", "person=11"]
    for person in people:
        side = person.images[0].shape[0]
        assert person.images[0].shape == person.images[1].shape == (side, side, 3)
        decoded = decode_skeleton(person.images[1])
        error = np.linalg.norm(decoded[:, :2] - person.keypoints[0, :, :2], axis=1)
        assert (decoded[:, 2] == 2).all() and np.median(error) < 1.0


def test_coco_min_keypoints_and_box_scale(tmp_path):
    image = photo(120, 160)
    save(tmp_path / "images" / "1.png", image)
    few = coco_person(115, 60, 12)
    for joint in range(3, 17):  # only the nose and the eyes labelled
        few[3 * joint + 2] = 0
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "keypoints": coco_person(50, 60, 12),
         "bbox": [30, 10, 40, 100]},
        {"id": 11, "image_id": 1, "category_id": 1, "keypoints": few},
    ]  # fmt: skip
    path = coco_file(tmp_path, annotations, [{"id": 1, "file_name": "1.png"}])

    def persons(**settings) -> list[Example]:
        return split(iter_coco_keypoints(path, tmp_path / "images", per_person=True, **settings))[0]

    names = {n: [p.source.rsplit("#", 1)[1] for p in persons(min_keypoints=n)] for n in (3, 4)}
    assert names == {3: ["person=10", "person=11"], 4: ["person=10"]}
    (whole,) = split(iter_coco_keypoints(path, tmp_path / "images", min_keypoints=4))[0]
    assert whole.keypoints.shape == (1, 17, 3)

    # The square around the 40 x 100 box centred at (50, 60), its side 100 x box_scale; black
    # where it leaves the 160 x 120 photo; the joints moved with it.
    truth = np.asarray(coco_person(50, 60, 12)).reshape(17, 3)
    for scale, (left, top, side) in ((1.0, (0, 10, 100)), (2.0, (-50, -40, 200))):
        person = persons(box_scale=scale)[0]
        expected = np.zeros((side, side, 3), np.uint8)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + side, 120), min(left + side, 160)
        expected[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
        np.testing.assert_array_equal(person.images[0], expected)
        np.testing.assert_allclose(person.keypoints[0, :, :2], truth[:, :2] - [left, top])


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"images": []}), "not a COCO file"),
        (json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}), "17 COCO"),
    ],
)
def test_coco_unusable_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "person_keypoints_x.json"
    path.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(DelvmError, match=message):
        list(iter_coco_keypoints(path, tmp_path / "images"))


# --- SA-1B ---------------------------------------------------------------------------------------


def sa1b_record(name: str, masks: list[np.ndarray], height: int, width: int) -> dict:
    annotations = []
    for i, mask in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()  # SA-1B stores the RLE string as text
        annotations.append({"id": i, "segmentation": rle, "area": int(mask.sum())})
    info = {"image_id": 1, "file_name": f"{name}.jpg", "height": height, "width": width}
    return {"image": info, "annotations": annotations}


def test_sa1b_instances_in_random_colours_with_bad_files_reported(tmp_path):
    height, width = 48, 64
    y, x = np.mgrid[0:height, 0:width]
    big = (x > 5) & (x < 50) & (y > 5) & (y < 40)
    small = (x - 20) ** 2 + (y - 20) ** 2 < 36  # inside `big`, listed last
    apart = (x > 54) & (y > 30)
    save(tmp_path / "sa_1.jpg", photo(height, width))
    (tmp_path / "sa_1.json").write_text(json.dumps(sa1b_record("sa_1", [big, apart, small], height, width)))  # fmt: skip
    # Bad ones: broken RLE, missing annotations, wrong mask size, missing image, broken JSON.
    broken = sa1b_record("sa_2", [big], height, width)
    counts = broken["annotations"][0]["segmentation"]["counts"]
    broken["annotations"][0]["segmentation"]["counts"] = counts[:-2]  # truncated
    save(tmp_path / "sa_2.jpg", photo(height, width))
    (tmp_path / "sa_2.json").write_text(json.dumps(broken))
    save(tmp_path / "sa_3.jpg", photo(height, width))
    (tmp_path / "sa_3.json").write_text(json.dumps({"image": {"file_name": "sa_3.jpg"}}))
    save(tmp_path / "sa_4.jpg", photo(height + 2, width))
    (tmp_path / "sa_4.json").write_text(json.dumps(sa1b_record("sa_4", [big], height, width)))
    (tmp_path / "sa_5.json").write_text(json.dumps(sa1b_record("sa_5", [big], height, width)))
    (tmp_path / "sa_6.json").write_text('{"image": {"file_name": "sa_6.jpg"}, "annot')
    short = sa1b_record("sa_7", [big], height, width)  # runs stop before the last pixel
    runs = rle_runs(short["annotations"][0]["segmentation"]["counts"])
    short_rle = mask_utils.frPyObjects(
        {"size": [height, width], "counts": runs[:-1]}, height, width
    )
    short["annotations"][0]["segmentation"]["counts"] = short_rle["counts"].decode()
    save(tmp_path / "sa_7.jpg", photo(height, width))
    (tmp_path / "sa_7.json").write_text(json.dumps(short))
    save(tmp_path / "sa_8.jpg", photo(height, width))  # no sa_8.json

    examples, skipped = split(iter_sa1b(tmp_path))
    (example,) = examples
    target = example.images[1]
    assert example.meta["nearest"] == [False, True]
    assert (target[~(big | apart)] == 0).all()
    for mask in (big & ~small, apart, small):
        assert len(np.unique(target[mask], axis=0)) == 1 and target[mask].max() > 0
    colours = {tuple(target[m][0]) for m in (big & ~small, apart, small)}
    assert len(colours) == 3
    np.testing.assert_array_equal(next(iter(iter_sa1b(tmp_path))).images[1], target)  # seeded
    # Painted within each mask's box: the same as painting whole masks.
    seed = example_seed(0, "sa_1.json")
    np.testing.assert_array_equal(target, render_instances([big, apart, small], seed))
    assert not np.array_equal(next(iter(iter_sa1b(tmp_path, seed=1))).images[1], target)
    reasons = {s.source.rsplit("/", 1)[-1]: s.reason for s in skipped}
    assert set(reasons) == {
        "sa_2.json", "sa_3.json", "sa_4.json", "sa_5.jpg", "sa_6.json", "sa_7.json", "sa_8.jpg"
    }  # fmt: skip
    assert "no annotation file sa_8.json" in reasons["sa_8.jpg"]
    assert "ends inside a number" in reasons["sa_2.json"]
    assert (
        f"covers {height * width - runs[-1]} pixels, not {height * width}" in reasons["sa_7.json"]
    )
    assert "'annotations' list" in reasons["sa_3.json"]
    assert "mask is [48, 64], image is [50, 64]" in reasons["sa_4.json"]
    assert "no such file" in reasons["sa_5.jpg"]
    assert "not valid JSON" in reasons["sa_6.json"]


def test_rle_runs_reads_pycocotools_strings():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (48, 64), (300, 2)]:
        mask = rng.random(shape) < rng.random()
        counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        runs = rle_runs(counts)
        flat = np.repeat(np.arange(len(runs)) % 2, runs)  # runs alternate 0, 1, 0, ...
        np.testing.assert_array_equal(flat.reshape(shape[::-1]).T, mask)
    with pytest.raises(ValueError, match="cannot appear"):
        rle_runs("ab~")


def test_sa1b_folder_without_annotations_is_an_error(tmp_path):
    save(tmp_path / "sa_1.jpg", photo())
    with pytest.raises(DelvmError, match="no SA-1B annotation files"):
        list(iter_sa1b(tmp_path))


# --- Pascal-5i -----------------------------------------------------------------------------------


def voc_root(tmp_path):
    root = tmp_path / "VOC2012"
    palette = list(np.random.default_rng(0).integers(0, 256, 768))
    labels = np.zeros((40, 60), np.uint8)
    labels[5:20, 5:25] = 1  # aeroplane: fold 0
    labels[25:35, 30:55] = 7  # car: fold 1
    labels[4, 4:26] = 255  # VOC boundary ("void")
    for name, label in (("2007_000032", labels), ("2007_000033", np.full((40, 60), 15, np.uint8))):
        save(root / "JPEGImages" / f"{name}.jpg", photo(40, 60))
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        mask = Image.fromarray(label, mode="P")
        mask.putpalette(palette)
        mask.save(root / "SegmentationClass" / f"{name}.png")
    (root / "SegmentationClass" / "2007_000039.png").write_bytes(b"\x89PNG broken")
    save(root / "JPEGImages" / "2007_000039.jpg", photo(40, 60))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2007_000032\n2007_000033\n2007_000039\n2007_000099\n")
    (lists / "train.txt").write_text("2007_000032\n2007_000033\n")
    return root, labels


def test_pascal5i_fold_classes_and_splits(tmp_path):
    root, labels = voc_root(tmp_path)
    val, skipped = split(iter_pascal5i(root, fold=0, split="val"))
    (aeroplane,) = val
    assert aeroplane.meta["class"] == "aeroplane" and aeroplane.source.endswith("#class=1")
    expected = np.repeat((labels == 1)[..., None], 3, axis=2) * 255
    np.testing.assert_array_equal(aeroplane.images[1], expected)  # void stays black
    reasons = {s.source.rsplit("/", 1)[-1]: s.reason for s in skipped}
    assert set(reasons) == {"2007_000039.png", "2007_000099.png"}
    assert "unreadable mask" in reasons["2007_000039.png"]
    assert "no such mask" in reasons["2007_000099.png"]

    train, _ = split(iter_pascal5i(root, fold=0, split="train"))
    assert sorted(e.meta["class"] for e in train) == ["car", "person"]  # classes 6..20 only
    fold1, _ = split(iter_pascal5i(root, fold=1, split="val"))
    assert [e.meta["class"] for e in fold1] == ["car"]
    # The SBD list format ("/JPEGImages/x.jpg /SegmentationClassAug/x.png") works too.
    sbd = tmp_path / "train_aug.txt"
    sbd.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n")
    (only,) = split(iter_pascal5i(root, fold=1, split="val", list_file=sbd))[0]
    assert only.meta["class"] == "car"


def test_pascal5i_min_pixels_and_mask_dir(tmp_path):
    root, labels = voc_root(tmp_path)
    assert np.count_nonzero(labels == 1) == 300  # the aeroplane of 2007_000032
    for min_pixels, count in ((300, 1), (301, 0)):
        examples, _ = split(iter_pascal5i(root, fold=0, split="val", min_pixels=min_pixels))
        assert len(examples) == count
    # Masks from another folder: only the images it holds a mask for, read from there.
    other = np.zeros((40, 60), np.uint8)
    other[30:38, 2:12] = 1
    (root / "MyMasks").mkdir()
    Image.fromarray(other, mode="P").save(root / "MyMasks" / "2007_000032.png")
    examples, skipped = split(iter_pascal5i(root, fold=0, split="val", mask_dir="MyMasks"))
    (aeroplane,) = examples
    np.testing.assert_array_equal(
        aeroplane.images[1], np.repeat((other == 1)[..., None], 3, 2) * 255
    )
    assert sum("no such mask" in s.reason for s in skipped) == 3


def test_pascal5i_bad_settings_are_clear_errors(tmp_path):
    root, _ = voc_root(tmp_path)
    with pytest.raises(DelvmError, match="fold 4"):
        list(iter_pascal5i(root, fold=4))
    with pytest.raises(DelvmError, match="split 'test'"):
        list(iter_pascal5i(root, fold=0, split="test"))
    with pytest.raises(DelvmError, match="VOC folder layout"):
        list(iter_pascal5i(tmp_path, fold=0))


# --- video ---------------------------------------------------------------------------------------


def moving_bar(index: int, height=48, width=64) -> np.ndarray:
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:, 4 * index : 4 * index + 8] = 255
    return frame


def write_video(path, frames: int, codec="mpeg4") -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(moving_bar(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def bar_position(frame: np.ndarray) -> int:
    return int(np.argmax(frame.mean(axis=(0, 2)) > 128))


def test_video_file_clips_with_stride_and_step(tmp_path):
    write_video(tmp_path / "walk.mp4", frames=12)
    (clip,) = split(iter_video(tmp_path / "walk.mp4", frames_per_clip=4, stride=2))[0]
    assert [bar_position(f) for f in clip.images] == [0, 8, 16, 24]  # frames 0, 2, 4, 6
    assert clip.source == f"{tmp_path / 'walk.mp4'}#frames=0..6"
    clips, _ = split(iter_video(tmp_path / "walk.mp4", frames_per_clip=4, stride=2, clip_step=1))
    assert len(clips) == 6  # starts 0..5; the last needs frames 5, 7, 9, 11
    assert [bar_position(c.images[0]) for c in clips] == [0, 4, 8, 12, 16, 20]


def test_video_folder_of_files_and_frame_folders_with_bad_input(tmp_path):
    write_video(tmp_path / "a.mp4", frames=6)
    (tmp_path / "broken.mp4").write_bytes(b"garbage" * 50)
    frames = tmp_path / "clip_b"
    for i in range(10):
        save(frames / f"frame_{i + 1}.png", moving_bar(i))  # frame_10 sorts after frame_9
    (frames / "frame_6.png").write_bytes(b"")  # a bad frame: no clip may straddle it
    examples, skipped = split(iter_video(tmp_path, frames_per_clip=2))
    from_folder = [e for e in examples if "clip_b" in e.source]
    assert [[bar_position(f) for f in e.images] for e in from_folder] == [[0, 4], [8, 12], [24, 28], [32, 36]]  # fmt: skip
    assert len([e for e in examples if "a.mp4" in e.source]) == 3
    reasons = {s.source.rsplit("/", 1)[-1]: s.reason for s in skipped}
    assert set(reasons) == {"broken.mp4", "frame_6.png"}
    assert "cannot decode" in reasons["broken.mp4"] and "empty" in reasons["frame_6.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DelvmError, match="no video files"):
        list(iter_video(tmp_path / "empty"))
    with pytest.raises(DelvmError, match="no such video file or folder"):
        list(iter_video(tmp_path / "missing.mp4"))


# --- plain image folders -------------------------------------------------------------------------


def test_image_folder_keeps_every_readable_image(tmp_path):
    good, bad = write_odd_images(tmp_path / "laion" / "part0")
    save(tmp_path / "laion" / "part1" / "cat.webp", photo())
    examples, skipped = split(SOURCES["image_folder"](folder=tmp_path / "laion"))
    assert {e.source.rsplit("/", 1)[-1].split(".")[0] for e in examples} == good | {"cat"}
    assert all(len(e.images) == 1 and e.images[0].shape == (40, 60, 3) for e in examples)
    check_skips(skipped, bad)
    rgba = next(e for e in examples if e.source.endswith("/rgba.png")).images[0]
    assert tuple(rgba[0, 0]) == (128, 0, 0)  # composited on black
    deep = next(e for e in examples if e.source.endswith("/deep16.png")).images[0]
    assert tuple(deep[0, 0]) == (156, 156, 156)  # 40000 / 65535 of full scale
    with pytest.raises(DelvmError, match="no such folder"):
        list(iter_image_folder(tmp_path / "nope"))


def test_registry_names_every_format():
    assert set(SOURCES) == {
        "paired", "coco_keypoints", "mpii", "sa1b", "pascal5i", "video", "image_folder", "toyworld"
    }  # fmt: skip
    toy = {"format": "toyworld", "resolution": 32, "segmentation": 2, "pose": 1, "derain": 1}
    examples = list(open_source(toy))
    assert [e.task for e in examples] == ["segmentation", "segmentation", "pose", "derain"]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"format": "nope"}, "source format 'nope': use one of paired"),
        ({"format": "paired", "root": "x", "rot": 1}, "paired source: .*'rot'"),
        ({"format": "sa1b"}, "sa1b source: .*'folder'"),
        ({"format": "toyworld", "size": 3}, r"toyworld source: unknown settings \['size'\]"),
    ],
)
def test_open_source_names_bad_settings(config, message):
    with pytest.raises(DelvmError, match=message):
        list(open_source(config))
