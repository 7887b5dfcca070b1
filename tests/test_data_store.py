"""The token store: format and verification, the build (tokens, balancing, report), resume, ranks."""

import inspect
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from delvm.cli import main
from delvm.data import store as store_module
from delvm.data.augment import augment_example, resize_example
from delvm.data.sources import iter_paired_folders
from delvm.data.store import (
    BuildConfig,
    Builder,
    TaskArrays,
    copy_seed,
    load_build_config,
    open_store,
    write_store,
)
from delvm.errors import DelvmError
from delvm.tokenizer import load_tokenizer
from tests.support.tiny import untrained_cpu_tokenizer
from tests.test_data_sources import coco_file, coco_person, photo, png_header, sa1b_record

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
BUILD = [sys.executable, "-m", "delvm.cli", "data", "build"]
IDENTITY = {"fingerprint": "f" * 16, "num_codes": 1024, "grid_size": 2, "path": "tok"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A random 16 px, f4 VQGAN (4x4 = 16 tokens per image) saved as a tokenizer folder."""
    tokenizer = untrained_cpu_tokenizer(
        resolution=16, hidden_channels=32, channel_mult=(1, 1, 1), z_channels=32,
        quantized_embed_dim=8, num_embeddings=256,
    )  # fmt: skip
    return tokenizer.save_pretrained(tmp_path_factory.mktemp("tok"))


def write_pairs(root: Path, count: int, seed: int, size=(20, 24)) -> Path:
    """A Rain13K-style paired folder: ROOT/input/NAME.png, ROOT/target/NAME.png."""
    rng = np.random.default_rng(seed)
    for name in ("input", "target"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        for name in ("input", "target"):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"im{i:03d}.png")
    return root


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def config_toml(path: Path, out: Path, tokenizer: Path, sources: list[dict], **settings) -> Path:
    lines = [f"out = {json.dumps(str(out))}", f"tokenizer = {json.dumps(str(tokenizer))}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    for spec in sources:
        lines.append("[[sources]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in spec.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- format ------------------------------------------------------------------------------------


def random_store(folder: Path, num_codes: int = 1024) -> dict[str, TaskArrays]:
    rng = np.random.default_rng(0)
    tasks = {
        "pose": TaskArrays(
            rng.integers(0, num_codes, (6, 2, 4)),
            np.array([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]),
            ["a.png", "b.png", "c.png"],
        ),
        "video": TaskArrays(
            rng.integers(0, num_codes, (2, 3, 4)), np.array([[0, 0], [1, 0]]), ["clip0", "clip1"]
        ),  # fmt: skip
    }
    write_store(folder, tasks, {**IDENTITY, "num_codes": num_codes})
    return tasks


@pytest.mark.parametrize("num_codes, dtype", [(1024, np.uint16), (70000, np.int32)])
def test_store_round_trip_is_memory_mapped_with_the_smallest_dtype(tmp_path, num_codes, dtype):
    tasks = random_store(tmp_path / "s", num_codes)
    store = open_store(tmp_path / "s", fingerprint=IDENTITY["fingerprint"])
    assert sorted(store.tasks) == ["pose", "video"]
    for name, arrays in tasks.items():
        got = store.tasks[name]
        assert isinstance(got.tokens, np.memmap) and got.tokens.dtype == dtype
        np.testing.assert_array_equal(got.tokens, arrays.tokens)
        np.testing.assert_array_equal(np.stack([got.origin, got.copy], 1), arrays.rows)
        assert got.sources == arrays.sources
    assert store.tasks["video"].images_per_example == 3 and store.tokens_per_image == 4


def test_truncated_changed_or_missing_files_and_a_foreign_tokenizer_are_refused(tmp_path):
    random_store(tmp_path / "s")
    tokens = tmp_path / "s" / "pose.tokens.npy"
    original = tokens.read_bytes()

    with pytest.raises(DelvmError, match="built with tokenizer f{16}.*uses 0123"):
        open_store(tmp_path / "s", fingerprint="0123456789abcdef")

    tokens.write_bytes(original[:-3])
    with pytest.raises(
        DelvmError, match=r"pose.tokens.npy: \d+ bytes, the manifest says .*truncated"
    ):
        open_store(tmp_path / "s")

    changed = bytearray(original)
    changed[-1] ^= 1
    tokens.write_bytes(bytes(changed))
    open_store(tmp_path / "s", verify=False)  # sizes match: only the checksum can tell
    with pytest.raises(DelvmError, match="pose.tokens.npy: checksum differs"):
        open_store(tmp_path / "s")

    tokens.unlink()
    with pytest.raises(DelvmError, match="pose.tokens.npy: missing"):
        open_store(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(DelvmError, match="not a token store"):
        open_store(tmp_path / "s")


def test_a_pickled_array_is_never_unpickled(tmp_path):
    random_store(tmp_path / "s")
    evil = tmp_path / "s" / "pose.tokens.npy"
    np.save(evil, np.array([{"x": 1}] * 6, dtype=object).reshape(6, 1, 1), allow_pickle=True)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["files"]["pose.tokens.npy"] = {
        "bytes": evil.stat().st_size,
        "sha256": store_module.sha256_file(evil),
    }
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DelvmError, match="pose.tokens.npy: not a readable .npy array"):
        open_store(tmp_path / "s")


# ---- build -------------------------------------------------------------------------------------


def test_build_stores_the_tokens_of_resized_and_augmented_examples(tmp_path, tokenizer_dir):
    big = write_pairs(tmp_path / "big", 12, seed=1)
    small = write_pairs(tmp_path / "small", 3, seed=2, size=(30, 18))
    config = BuildConfig(
        out=str(tmp_path / "store"), tokenizer=str(tokenizer_dir), shard_size=4, batch_size=3,
        augment={"scale": [0.3, 1.0]}, tasks={"small": {"augment": {"hflip": 1.0}}},
        sources=[{"format": "paired", "root": str(big), "task": "big"},
                 {"format": "paired", "root": str(small), "task": "small"}],
    )  # fmt: skip
    tokenizer = load_tokenizer(tokenizer_dir)
    report = Builder(config, tokenizer).run()
    store = open_store(config.out, fingerprint=tokenizer.fingerprint())
    assert not (tmp_path / "store" / ".build").exists()

    # 12 vs 3 examples: the tail task gets round(12 / 3) - 1 = 3 augmented copies of each.
    assert report["tasks"]["small"] == {
        "examples": 3, "images_per_example": 2, "copies": 3, "rows": 12,
        "tokens_before": 3 * 2 * 16, "tokens_after": 12 * 2 * 16,
    }  # fmt: skip
    assert report["tasks"]["big"]["copies"] == 0 and report["tasks"]["big"]["rows"] == 12
    assert store.balance == "augment" and store.grid_size == 4

    small_task = store.tasks["small"]
    np.testing.assert_array_equal(small_task.origin, [0, 1, 2] + [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(small_task.copy, [0, 0, 0] + [1, 2, 3] * 3)
    examples = list(iter_paired_folders(small, task="small"))
    assert small_task.sources == [e.source for e in examples]
    augment = config.augment_config("small", 16)
    assert augment.hflip == 1.0 and augment.scale == (0.3, 1.0)
    for row in (1, 3, 11):
        example, copy = examples[small_task.origin[row]], small_task.copy[row]
        if copy == 0:
            made = resize_example(example, 16)
        else:
            seed = copy_seed(0, "small", int(small_task.origin[row]), copy)
            made = augment_example(example, augment, seed)
        expected = tokenizer.encode(torch.from_numpy(np.stack(made.images)))
        np.testing.assert_array_equal(small_task.tokens[row], expected.numpy())


def test_the_same_data_in_another_folder_builds_the_same_augmented_copies(tmp_path, tokenizer_dir):
    # The copies' seeds must not depend on where the data sits (they once hashed the file path).
    tokens = []
    for place in ("here", "elsewhere/deeper"):
        write_pairs(tmp_path / place / "big", 8, seed=1)
        write_pairs(tmp_path / place / "small", 2, seed=2)
        config = BuildConfig(
            out=str(tmp_path / place / "store"), tokenizer=str(tokenizer_dir),
            augment={"scale": [0.3, 1.0]},
            sources=[{"format": "paired", "root": str(tmp_path / place / name), "task": name}
                     for name in ("big", "small")],
        )  # fmt: skip
        tokenizer = load_tokenizer(tokenizer_dir)
        Builder(config, tokenizer).run()
        store = open_store(config.out, fingerprint=tokenizer.fingerprint())
        assert store.tasks["small"].copy.max() == 3
        tokens.append({name: np.asarray(task.tokens) for name, task in store.tasks.items()})
    for name in ("big", "small"):
        np.testing.assert_array_equal(tokens[0][name], tokens[1][name])


def test_balance_none_and_explicit_copies_and_the_cap(tmp_path, tokenizer_dir):
    big = write_pairs(tmp_path / "big", 10, seed=1, size=(16, 16))
    small = write_pairs(tmp_path / "small", 1, seed=2, size=(16, 16))
    sources = [{"format": "paired", "root": str(big), "task": "big"},
               {"format": "paired", "root": str(small), "task": "small"}]  # fmt: skip
    tokenizer = load_tokenizer(tokenizer_dir)

    def build(name, **settings):
        config = BuildConfig(out=str(tmp_path / name), tokenizer=str(tokenizer_dir),
                             sources=sources, **settings)  # fmt: skip
        return Builder(config, tokenizer).run()["tasks"]

    none = build("none", balance="none")
    assert none["small"]["copies"] == 0 and none["small"]["tokens_after"] == 32
    assert build("capped", max_copies=4)["small"]["copies"] == 4  # 10 / 1 - 1 = 9, capped
    assert build("explicit", tasks={"small": {"copies": 2}})["small"]["rows"] == 3
    with pytest.raises(DelvmError, match="copies: only with balance = 'augment'"):
        BuildConfig(out="x", tokenizer="t", sources=sources, balance="none",
                    tasks={"small": {"copies": 2}})  # fmt: skip


def test_bad_files_are_skipped_with_reasons_and_every_good_example_kept(tmp_path, tokenizer_dir):
    root = write_pairs(tmp_path / "pairs", 4, seed=3)
    (root / "input" / "im001.png").write_bytes(b"")  # zero bytes
    (root / "input" / "im002.png").write_bytes(b"not an image at all")
    (root / "input" / "lonely.png").write_bytes((root / "input" / "im000.png").read_bytes())
    config = BuildConfig(out=str(tmp_path / "store"), tokenizer=str(tokenizer_dir),
                         sources=[{"format": "paired", "root": str(root), "task": "derain"}])  # fmt: skip
    report = Builder(config, load_tokenizer(tokenizer_dir)).run()
    assert report["tasks"]["derain"]["examples"] == 2  # im000, im003
    skipped = {Path(s["file"]).name: s["reason"] for s in report["sources"][0]["skipped"]}
    assert set(skipped) == {"im001.png", "im002.png", "lonely.png"}
    assert "no matching target" in skipped["lonely.png"]
    saved = json.loads((tmp_path / "store" / "report.json").read_text())
    assert saved["sources"][0]["skipped"] == report["sources"][0]["skipped"]
    assert open_store(tmp_path / "store").tasks["derain"].num_examples == 2


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_no_bad_file_stops_a_build_and_each_is_reported_with_its_reason(tmp_path, tokenizer_dir):
    pairs = write_pairs(tmp_path / "pairs", 3, seed=8)
    bad_inputs = {
        "empty.png": b"",
        "truncated.jpg": jpeg_bytes(photo(40, 60))[:300],
        "text.png": b"not an image\n",
        "bomb.png": png_header(20_000, 20_000),  # over Pillow's own limit: its error, not OSError
        "warned.png": png_header(10_000, 10_000),  # Pillow would only warn
    }
    for name, data in bad_inputs.items():
        (pairs / "input" / name).write_bytes(data)
        Image.fromarray(photo(20, 24)).save(pairs / "target" / f"{Path(name).stem}.png")
    Image.fromarray(photo(20, 24)).save(pairs / "input" / "lonely.png")

    coco_images = tmp_path / "coco" / "images"
    coco_images.mkdir(parents=True)
    for i in (1, 2):
        Image.fromarray(photo(120, 160, seed=i)).save(coco_images / f"{i:012d}.jpg")
    person = {"category_id": 1, "keypoints": coco_person(50, 60, 12)}
    coco = coco_file(
        tmp_path / "coco",
        [{"id": 10, "image_id": 1, **person}, {"id": 11, "image_id": 2, **person},
         {"id": 12, "image_id": 7, **person}],  # image 7 is not in `images`
        [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
    )  # fmt: skip

    sa1b = tmp_path / "sa1b"
    sa1b.mkdir()
    mask = np.zeros((48, 64), dtype=bool)
    mask[5:40, 5:50] = True
    for name in ("sa_1", "sa_2", "sa_3", "sa_4", "sa_5"):
        Image.fromarray(photo(48, 64)).save(sa1b / f"{name}.jpg")
        record = sa1b_record(name, [mask], 48, 64)
        (sa1b / f"{name}.json").write_text(json.dumps(record))
    (sa1b / "sa_3.json").unlink()  # an image without its annotation
    (sa1b / "sa_4.json").write_text('{"image": {"file_name": "sa_4.jpg"}, "annot')
    record = sa1b_record("sa_5", [mask], 48, 64)
    record["annotations"][0]["segmentation"]["counts"] = "\x7f\x7f"  # not RLE characters
    (sa1b / "sa_5.json").write_text(json.dumps(record))

    config = BuildConfig(
        out=str(tmp_path / "store"), tokenizer=str(tokenizer_dir), shard_size=2, batch_size=2,
        balance="none",
        sources=[{"format": "paired", "root": str(pairs), "task": "derain"},
                 {"format": "coco_keypoints", "json_path": str(coco),
                  "image_dir": str(coco_images)},
                 {"format": "sa1b", "folder": str(sa1b)}],
    )  # fmt: skip
    report = Builder(config, load_tokenizer(tokenizer_dir)).run()

    def reasons(index):
        skipped = report["sources"][index]["skipped"]
        return {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in skipped}

    assert reasons(0).keys() == {*bad_inputs, "lonely.png"}
    expected = [("empty.png", "empty"), ("truncated.jpg", "truncated"),
                ("text.png", "not an image"), ("bomb.png", "pixel limit"),
                ("warned.png", "pixel limit"), ("lonely.png", "no matching target")]  # fmt: skip
    for name, words in expected:
        assert words in reasons(0)[name], (name, reasons(0)[name])
    assert reasons(1) == {coco.name + "#annotation=12": "image_id 7 is not in the file's 'images'"}
    assert reasons(2).keys() == {"sa_3.jpg", "sa_4.json", "sa_5.json"}
    assert "no annotation file sa_3.json" in reasons(2)["sa_3.jpg"]
    assert "not valid JSON" in reasons(2)["sa_4.json"]
    assert "invalid RLE" in reasons(2)["sa_5.json"]
    assert [len(s["skipped"]) for s in report["sources"]] == [6, 1, 3]

    store = open_store(config.out)  # every valid example survives, in source order
    names = {task: [Path(s).name for s in t.sources] for task, t in store.tasks.items()}
    assert names == {
        "derain": ["im000.png", "im001.png", "im002.png"],
        "pose": ["000000000001.jpg", "000000000002.jpg"],
        "segmentation": ["sa_1.jpg", "sa_2.jpg"],
    }
    printed = store_module.format_report(report)
    assert "6 skipped" in printed and "skipped " + str(pairs / "input" / "bomb.png") in printed


def test_unusable_sources_and_configs_are_clear_errors(tmp_path, tokenizer_dir):
    root = write_pairs(tmp_path / "pairs", 1, seed=3)
    (root / "input" / "im000.png").write_bytes(b"")
    tokenizer = load_tokenizer(tokenizer_dir)

    def run(**settings):
        values = {"out": str(tmp_path / "out"), "tokenizer": str(tokenizer_dir), **settings}
        Builder(BuildConfig(**values), tokenizer).run()

    with pytest.raises(
        DelvmError, match=r"sources\[0\] \(paired\): no usable examples \(1 skipped"
    ):
        run(sources=[{"format": "paired", "root": str(root)}])
    with pytest.raises(DelvmError, match="format 'coco' is not one of"):
        run(sources=[{"format": "coco"}])
    with pytest.raises(DelvmError, match=r"sources\[0\]: paired source:.*unexpected keyword"):
        run(
            sources=[{"format": "paired", "root": str(root), "colour": 1}], out=str(tmp_path / "o2")
        )
    with pytest.raises(DelvmError, match="augment for pose: unknown"):
        run(sources=[{"format": "paired", "root": str(root)}], tasks={"pose": {"augment": {"x": 1}}},
            out=str(tmp_path / "o3"))  # fmt: skip
    with pytest.raises(DelvmError, match="task name 'a/b'"):
        write_pairs(tmp_path / "ok", 1, seed=4)
        run(sources=[{"format": "paired", "root": str(tmp_path / "ok"), "task": "a/b"}],
            out=str(tmp_path / "o4"))  # fmt: skip
    bad = tmp_path / "bad.toml"
    bad.write_text('out = "x"\ntokenizer = "t"\nshards = 3\n')
    with pytest.raises(DelvmError, match=r"bad.toml: unknown setting\(s\) \['shards'\]"):
        load_build_config(bad)


def test_a_resumed_build_skips_finished_shards_and_refuses_another_config(
    tmp_path, tokenizer_dir, monkeypatch
):
    root = write_pairs(tmp_path / "pairs", 10, seed=5)
    config = BuildConfig(out=str(tmp_path / "store"), tokenizer=str(tokenizer_dir), shard_size=2,
                         batch_size=2, sources=[{"format": "paired", "root": str(root)}])  # fmt: skip
    tokenizer = load_tokenizer(tokenizer_dir)
    real_encode, calls = Builder._encode, []

    def crash_on_third(self, examples):
        calls.append(len(examples))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(self, examples)

    monkeypatch.setattr(Builder, "_encode", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        Builder(config, tokenizer).run()
    finished = sorted((tmp_path / "store" / ".build" / "base").glob("*.npy"))
    assert [p.name for p in finished] == ["000000.npy", "000001.npy"]

    written = []
    real_save = store_module._save_npy
    monkeypatch.setattr(
        store_module, "_save_npy", lambda p, a: (written.append(p.name), real_save(p, a))
    )
    monkeypatch.setattr(Builder, "_encode", real_encode)
    other = BuildConfig(**{**config.__dict__, "seed": 1})
    with pytest.raises(DelvmError, match="unfinished build with a different config"):
        Builder(other, tokenizer).run()
    write_pairs(tmp_path / "more", 1, seed=9)  # a file added since: shards would shift
    for name in ("input", "target"):
        (tmp_path / "more" / name / "im000.png").rename(root / name / "new.png")
    with pytest.raises(DelvmError, match=r"now list \[11\] files or records.*listed \[10\]"):
        Builder(config, tokenizer).run()
    for name in ("input", "target"):
        (root / name / "new.png").unlink()
    Builder(BuildConfig(**{**config.__dict__, "workers": 2}), tokenizer).run()  # workers may differ
    assert "000000.npy" not in written and "000001.npy" not in written
    assert "000002.npy" in written
    assert open_store(tmp_path / "store").tasks["derain"].num_examples == 10


def test_a_unit_that_raises_anything_is_skipped_with_the_error(
    tmp_path, tokenizer_dir, monkeypatch
):
    from delvm.data.sources import paired

    root = write_pairs(tmp_path / "pairs", 4, seed=10)
    real_read = paired._read_pair

    def read_pair(unit, **settings):
        if unit[0].name == "im001.png":
            raise MemoryError("decoder ran out of memory\non two lines")
        yield from real_read(unit, **settings)

    monkeypatch.setattr(paired, "_read_pair", read_pair)
    config = BuildConfig(out=str(tmp_path / "store"), tokenizer=str(tokenizer_dir), workers=2,
                         sources=[{"format": "paired", "root": str(root)}])  # fmt: skip
    report = Builder(config, load_tokenizer(tokenizer_dir)).run()
    (skipped,) = report["sources"][0]["skipped"]
    assert skipped == {
        "file": str(root / "input" / "im001.png"),
        "reason": "unexpected error reading it "
        "(MemoryError: decoder ran out of memory on two lines)",
    }
    assert [Path(s).name for s in open_store(config.out).tasks["derain"].sources] == [
        "im000.png", "im002.png", "im003.png"
    ]  # fmt: skip


def test_a_file_that_changes_between_the_passes_stops_the_build(
    tmp_path, tokenizer_dir, monkeypatch
):
    big = write_pairs(tmp_path / "big", 4, seed=11)
    small = write_pairs(tmp_path / "small", 2, seed=12)
    config = BuildConfig(
        out=str(tmp_path / "store"), tokenizer=str(tokenizer_dir),
        sources=[{"format": "paired", "root": str(big), "task": "big"},
                 {"format": "paired", "root": str(small), "task": "small"}],
    )  # fmt: skip
    real_plan = Builder._plan

    def plan_then_break_a_file(self):
        plan = real_plan(self)
        (small / "input" / "im001.png").write_bytes(b"")  # after the base pass read it
        return plan

    monkeypatch.setattr(Builder, "_plan", plan_then_break_a_file)
    with pytest.raises(
        DelvmError, match=r"im001.png: changed since the base pass read it \(empty file"
    ):
        Builder(config, load_tokenizer(tokenizer_dir)).run()


@pytest.mark.parametrize("name", ["toyworld.toml", "real_formats.toml"])
def test_example_configs_parse_and_name_real_source_arguments(name):
    from delvm.data.sources import SOURCES
    from delvm.data.toyworld import ToyWorldConfig

    config = load_build_config(f"data/{name}", tokenizer="tok")
    for spec in config.sources:
        kwargs = {k: v for k, v in spec.items() if k != "format"}
        if spec["format"] == "toyworld":
            ToyWorldConfig(**kwargs)
        else:
            inspect.signature(SOURCES[spec["format"]]).bind(**kwargs)
    config.augment_config("any", 64)


# ---- the command line: SIGKILL and resume, torchrun ranks, inspect ------------------------------


@pytest.fixture(scope="module")
def build_case(tmp_path_factory, tokenizer_dir):
    """A config with a head and a tail task (so both passes run), built once uninterrupted."""
    base = tmp_path_factory.mktemp("case")
    big = write_pairs(base / "big", 48, seed=6)
    small = write_pairs(base / "small", 8, seed=7, size=(24, 20))
    config = config_toml(
        base / "build.toml", base / "unused", tokenizer_dir,
        [{"format": "paired", "root": str(big), "task": "big"},
         {"format": "paired", "root": str(small), "task": "small"}],
        shard_size=4, batch_size=4,
    )  # fmt: skip
    subprocess.run([*BUILD, str(config), "--out", str(base / "reference"), "--device", "cpu"],
                   check=True, env=ENV, cwd=ROOT, capture_output=True)  # fmt: skip
    return config, base / "reference"


def test_worker_processes_build_the_same_store_as_one_process(tmp_path, build_case):
    config, reference = build_case
    tokenizer = load_tokenizer(load_build_config(config).tokenizer)
    Builder(load_build_config(config, out=str(tmp_path / "workers"), workers=2), tokenizer).run()
    assert files_of(tmp_path / "workers") == files_of(reference)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", "-m", "delvm.cli", *args]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_after, resume_with",
    [("base/000002.json", []), ("copies/000012.json", ["torchrun", "--workers", "2"])],
)
def test_sigkilled_build_resumes_to_a_byte_identical_store(
    tmp_path, build_case, kill_after, resume_with
):
    """Killed in the base pass (resumed alike) or in the copies pass (resumed by 2 ranks with 2
    workers each: the shards a killed build left do not depend on who made them)."""
    config, reference = build_case
    out = tmp_path / "killed"
    args = ["data", "build", str(config), "--out", str(out), "--device", "cpu"]
    victim = subprocess.Popen([*BUILD, *args[2:]], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    marker = out / ".build" / kill_after
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert marker.exists() and not (out / "manifest.json").exists(), "killed part-way"
    done = len(list((out / ".build").glob("*/*.json")))
    if resume_with[:1] == ["torchrun"]:
        command = torchrun(*args, *resume_with[1:])
    else:
        command = [*BUILD, *args[2:], *resume_with]
    resumed = subprocess.run(
        command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done} finished shards kept" in resumed.stdout
    assert files_of(out) == files_of(reference)


@pytest.mark.slow
def test_two_torchrun_ranks_build_the_same_store_as_one_process(tmp_path, build_case):
    config, reference = build_case
    command = torchrun("data", "build", str(config), "--out", str(tmp_path / "two"),
                       "--device", "cpu", "--workers", "1")  # fmt: skip
    result = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_of(tmp_path / "two") == files_of(reference)


def test_inspect_prints_counts_and_writes_a_decoded_sentence_grid(tmp_path, build_case, capsys):
    _, reference = build_case
    grid = tmp_path / "grid.png"
    assert main(["data", "inspect", str(reference), "--seq-len", "64", "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "big" in out and "48" in out and "tokens after" in out
    # 2 tasks -> 2 rows; 64 tokens / (2 images x 16 tokens) = 2 examples = 4 images of 16 px.
    assert Image.open(grid).size == (4 * 16 + 3 * 4, 2 * 16 + 4)

    bad = tmp_path / "copy"
    bad.mkdir()
    for name, data in files_of(reference).items():
        (bad / name).write_bytes(data)
    (bad / "big.tokens.npy").write_bytes(b"")
    assert main(["data", "inspect", str(bad)]) == 2
    assert "big.tokens.npy: 0 bytes" in capsys.readouterr().err
