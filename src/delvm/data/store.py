"""The token store: every task's tokenized examples as one memory-mappable array, and its build.

A store folder (every file but the manifest is listed in manifest.json with size and sha256):

    manifest.json         written last; a folder without one is an unfinished build
    report.json           the build report: examples, skipped files, tokens before/after balancing
    TASK.tokens.npy       [rows, images, h*w] code ids, uint16 (int32 for codebooks > 65,536)
    TASK.rows.npy         [rows, 2] int64: (original example id, augmentation copy; 0 = none)
    TASK.origins.json     the source (file) of each original example, by id

Rows of a task are its original examples in source order (copy 0: shorter side resized, centre
crop), then, under `augment` balancing, N augmented copies of each (copies 1..N), made before
tokenization with one shared crop/flip per example. The sampler keeps every copy of an original on
the same side of the held-out split by the id in TASK.rows.npy.

`delvm data build CONFIG` (see `BuildConfig`) works in shards: per task, fixed-size chunks of
original examples in source order, each written atomically with its checksum into STORE/.build/.
A killed build continues at the first unfinished shard; finished shards are never rewritten; the
finished store is byte-identical to an uninterrupted build. Under torchrun, ranks take disjoint
shards and rank 0 assembles the store once every shard exists.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
import tomllib
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from delvm.configs import find_config
from delvm.data.augment import AugmentConfig, augment_example, resize_example
from delvm.data.example import Example, Skipped
from delvm.data.sources import SOURCES
from delvm.data.sources.common import example_seed
from delvm.errors import DelvmError
from delvm.fileio import atomic_write, read_json, write_json
from delvm.tokenizer import VQGAN, load_tokenizer
from delvm.tokenizer.folders import Shard, tokenizer_identity

FORMAT = "delvm-token-store"
VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
WORK = ".build"  # shards of an unfinished build
TASK_FILES = ("tokens.npy", "rows.npy", "origins.json")  # per task: TASK.<part>
BALANCE_MODES = ("none", "resample", "augment")
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # task names become file names


def token_dtype(num_codes: int) -> np.dtype:
    return np.dtype(np.uint16) if num_codes <= 65536 else np.dtype(np.int32)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the name
            np.lib.format.write_array(f, array, allow_pickle=False)

    atomic_write(path, write)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DelvmError(f"{path}: not a readable .npy array ({err}); rebuild the store") from None


# ---- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskTokens:
    """One task of a store: token rows (memory-mapped) and where each row came from."""

    name: str
    tokens: np.ndarray  # [rows, images, h*w], memory-mapped
    origin: np.ndarray  # [rows] id of the original example the row was made from
    copy: np.ndarray  # [rows] augmentation copy index, 0 = the un-augmented example
    sources: list[str]  # per original example id: its file / record

    @property
    def num_examples(self) -> int:
        return len(self.sources)

    @property
    def images_per_example(self) -> int:
        return self.tokens.shape[1]


@dataclass(frozen=True)
class TokenStore:
    path: Path
    manifest: dict
    tasks: dict[str, TaskTokens]

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def num_codes(self) -> int:
        return self.manifest["tokenizer"]["num_codes"]

    @property
    def grid_size(self) -> int:
        return self.manifest["grid_size"]

    @property
    def tokens_per_image(self) -> int:
        return self.manifest["grid_size"] ** 2

    @property
    def balance(self) -> str:
        return self.manifest["balance"]


def open_store(path: str | Path, fingerprint: str | None = None, verify: bool = True) -> TokenStore:
    """Open a store read-only, checking every file against the manifest.

    Sizes are always checked; `verify` also compares sha256 checksums (reads every byte once).
    `fingerprint`: the tokenizer this run uses; a store made by another one is refused.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        if (path / WORK).is_dir():
            raise DelvmError(f"{path}: unfinished build; rerun `delvm data build` to resume it")
        raise DelvmError(
            f"{path}: not a token store (no {MANIFEST}); build one with `delvm data build`"
        )
    manifest = read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DelvmError(
            f"{path / MANIFEST}: not a {FORMAT} v{VERSION} manifest; rebuild the store"
        )
    if fingerprint is not None and fingerprint != manifest["tokenizer"]["fingerprint"]:
        raise DelvmError(
            f"{path}: built with tokenizer {manifest['tokenizer']['fingerprint']}, but this run "
            f"uses {fingerprint}; use the tokenizer the store was built with, or rebuild the store"
        )
    for name, expected in manifest["files"].items():
        _check_file(path / name, expected, verify)
    tasks = {}
    for name, info in manifest["tasks"].items():
        tokens = _load_npy(path / f"{name}.tokens.npy")
        rows = _load_npy(path / f"{name}.rows.npy")
        sources = read_json(path / f"{name}.origins.json")["sources"]
        shape = (info["rows"], info["images_per_example"], manifest["grid_size"] ** 2)
        if tokens.shape != shape or rows.shape != (info["rows"], 2):
            raise DelvmError(
                f"{path / name}.tokens.npy: shape {tokens.shape} differs from the manifest's "
                f"{shape}; rebuild the store"
            )
        rows = np.asarray(rows)
        tasks[name] = TaskTokens(name, tokens, rows[:, 0], rows[:, 1], sources)
    return TokenStore(path, manifest, tasks)


def _check_file(path: Path, expected: dict, verify: bool) -> None:
    if not path.is_file():
        raise DelvmError(f"{path}: missing from the store; rebuild it with `delvm data build`")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise DelvmError(
            f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated or changed); "
            "rebuild the store"
        )
    if verify and sha256_file(path) != expected["sha256"]:
        raise DelvmError(f"{path}: checksum differs from the manifest (changed); rebuild the store")


# ---- writing -----------------------------------------------------------------------------------


@dataclass
class TaskArrays:
    """A task's rows in memory, for `write_store` (tests, tools that tokenize on their own)."""

    tokens: np.ndarray  # [rows, images, h*w]
    rows: np.ndarray  # [rows, 2] (original example id, copy index)
    sources: list[str]  # per original example id


def write_store(
    folder: str | Path,
    tasks: dict[str, TaskArrays],
    tokenizer: dict,
    balance: str = "none",
    report: dict | None = None,
) -> Path:
    """Write a complete store from arrays. `tokenizer`: {fingerprint, num_codes, grid_size, ...}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer["num_codes"])
    infos = {}
    for name, arrays in sorted(tasks.items()):
        if not TASK_NAME.fullmatch(name):
            raise DelvmError(f"task name {name!r}: use letters, digits, _ . -")
        _write_task(folder, name, [arrays.tokens], arrays.rows, arrays.sources, dtype)
        infos[name] = _task_info(arrays.rows, arrays.tokens.shape[1], len(arrays.sources))
    write_json(folder / REPORT, report or {})
    _write_manifest(folder, tokenizer, balance, infos, {})
    return folder


def _task_info(rows: np.ndarray, images_per_example: int, examples: int) -> dict:
    return {
        "examples": examples,
        "rows": len(rows),
        "copies": int(rows[:, 1].max()) if len(rows) else 0,
        "images_per_example": images_per_example,
    }


def _write_task(
    folder: Path,
    name: str,
    chunks: list[np.ndarray],
    rows: np.ndarray,
    sources: list[str],
    dtype: np.dtype,
) -> None:
    """TASK.tokens.npy from `chunks` (stacked in order, streamed), TASK.rows.npy, .origins.json."""
    shape = (sum(len(c) for c in chunks), *chunks[0].shape[1:])
    if shape[0] != len(rows):
        raise ValueError(f"task {name}: {shape[0]} token rows but {len(rows)} row records")

    def write_tokens(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        start = 0
        for chunk in chunks:
            out[start : start + len(chunk)] = chunk
            start += len(chunk)
        out.flush()
        del out

    atomic_write(folder / f"{name}.tokens.npy", write_tokens)
    _save_npy(folder / f"{name}.rows.npy", np.ascontiguousarray(rows, dtype=np.int64))
    write_json(folder / f"{name}.origins.json", {"sources": list(sources)})


def _write_manifest(
    folder: Path, tokenizer: dict, balance: str, tasks: dict[str, dict], build: dict
) -> None:
    files = {}
    for name in [REPORT, *(f"{t}.{part}" for t in tasks for part in TASK_FILES)]:
        path = folder / name
        files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": tokenizer,
        "grid_size": tokenizer["grid_size"],
        "balance": balance,
        "tasks": tasks,
        "build": build,
        "files": files,
    }
    write_json(folder / MANIFEST, manifest)


# ---- the build configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class BuildConfig:
    """`delvm data build CONFIG` (TOML). Sources route examples to tasks by their `task`.

    sources: [{format = "paired", root = ..., task = ...}, ...]: a format of
        `delvm.data.sources.SOURCES` and its keyword arguments.
    balance: none | resample | augment. `augment` stores N augmented copies of each example of a
        tail task, N = round(largest task's tokens / this task's) - 1, at most `max_copies`;
        `resample` and `none` store originals only (resampling happens in the sampler).
    augment: RandomResizedCrop / flip settings for every task (AugmentConfig fields but `size`).
    tasks: per-task overrides: {"pose": {augment = {hflip = 0.0}, copies = 5}}.
    image_size: side of the tokenized images; 0 = the tokenizer's resolution.
    shard_size: original examples per shard (the unit of resume and of work per rank).
    batch_size: examples per encoder call.
    """

    out: str = ""
    tokenizer: str = ""
    sources: list = field(default_factory=list)
    balance: str = "augment"
    augment: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    image_size: int = 0
    shard_size: int = 256
    batch_size: int = 32
    max_copies: int = 32
    seed: int = 0
    bf16: bool = False

    def __post_init__(self) -> None:
        if not self.out or not self.tokenizer:
            raise DelvmError("build config: set `out` (store folder) and `tokenizer` (its folder)")
        if self.balance not in BALANCE_MODES:
            raise DelvmError(f"build config balance = {self.balance!r}: use one of {BALANCE_MODES}")
        if not self.sources:
            raise DelvmError("build config: no [[sources]]; add at least one (see configs/data/)")
        for i, spec in enumerate(self.sources):
            if not isinstance(spec, dict) or spec.get("format") not in SOURCES:
                raise DelvmError(
                    f"build config sources[{i}]: format {spec.get('format')!r} is not one of "
                    f"{sorted(SOURCES)}"
                )
        for name in ("shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise DelvmError(f"build config {name} = {getattr(self, name)}: must be >= 1")
        if self.max_copies < 0 or self.image_size < 0:
            raise DelvmError("build config max_copies and image_size must be >= 0")
        for task, settings in self.tasks.items():
            unknown = sorted(set(settings) - {"augment", "copies"})
            if unknown:
                raise DelvmError(
                    f"build config tasks.{task}: unknown {unknown}; use augment, copies"
                )
            if "copies" in settings and (self.balance != "augment" or settings["copies"] < 0):
                raise DelvmError(
                    f"build config tasks.{task}.copies: only with balance = 'augment', and >= 0"
                )

    def augment_config(self, task: str, size: int) -> AugmentConfig:
        settings = {**self.augment, **self.tasks.get(task, {}).get("augment", {})}
        known = {f.name for f in fields(AugmentConfig)} - {"size"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise DelvmError(
                f"build config augment for {task}: unknown {unknown}; use {sorted(known)}"
            )
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
        return AugmentConfig(size=size, **settings)


def load_build_config(path: str | Path, **overrides) -> BuildConfig:
    """Read a TOML build config; `overrides` (e.g. out=..., tokenizer=...) replace its values."""
    path = find_config(path)
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise DelvmError(f"{path}: invalid TOML ({err})") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(BuildConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DelvmError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return BuildConfig(**values)


# ---- the build ---------------------------------------------------------------------------------


def copy_seed(seed: int, task: str, origin: int, copy: int) -> int:
    """The seed of one augmented copy: from the example's place in its task, not its file path,
    so the same data built from another folder gets the same copies."""
    return example_seed(seed, f"{task}/{origin}#{copy}")


class ShardWriter:
    """One shard: collects examples, encodes them `batch_size` at a time, writes atomically.

    The array is written before its JSON, so a shard whose JSON exists is complete.
    """

    def __init__(
        self, stem: Path, encode: Callable[[list[list[np.ndarray]]], np.ndarray], batch_size: int
    ):
        self.stem, self.encode, self.batch_size = stem, encode, batch_size
        self.pending: list[list[np.ndarray]] = []
        self.tokens: list[np.ndarray] = []
        self.rows: list[tuple[int, int]] = []
        self.originals = 0

    def add(self, origin: int, copies: Iterable[tuple[int, Example]]) -> None:
        """The rows made from original example `origin`: (copy index, example) pairs."""
        self.originals += 1
        for copy, example in copies:
            self.pending.append(example.images)
            self.rows.append((origin, copy))
            if len(self.pending) == self.batch_size:
                self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.tokens.append(self.encode(self.pending))
            self.pending = []

    def finish(self) -> None:
        self._flush()
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        npy = self.stem.with_suffix(".npy")
        _save_npy(npy, np.concatenate(self.tokens))
        write_json(self.stem.with_suffix(".json"), {"rows": self.rows, "sha256": sha256_file(npy)})


@dataclass
class SourceStats:
    """What one configured source yielded in the first pass."""

    examples: dict[str, int] = field(default_factory=dict)  # task -> examples
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}


@dataclass
class PassResult:
    counts: dict[str, int] = field(default_factory=dict)  # task -> original examples
    origins: dict[str, list[str]] = field(default_factory=dict)  # task -> source of each
    sources: list[SourceStats] = field(default_factory=list)


class Builder:
    """Sources -> resized (and augmented) examples -> tokens -> shards -> the store."""

    def __init__(self, config: BuildConfig, tokenizer: VQGAN, shard: Shard | None = None):
        self.config, self.tokenizer, self.shard = config, tokenizer, shard or Shard()
        self.out = Path(config.out)
        self.work = self.out / WORK
        factor = tokenizer.config.downsample_factor
        self.size = config.image_size or tokenizer.config.resolution
        if self.size % factor:
            raise DelvmError(
                f"build config image_size {self.size}: not a multiple of the tokenizer's "
                f"downsampling factor {factor}"
            )
        self.grid = self.size // factor
        self.dtype = token_dtype(tokenizer.num_codes)
        self.encode_seconds = 0.0
        self.images_per_example: dict[str, int] = {}
        # Validate every augmentation setting now, not hours into a build.
        self.augment = {t: config.augment_config(t, self.size) for t in config.tasks}
        config.augment_config("", self.size)

    @property
    def is_main(self) -> bool:
        return self.shard.rank == 0

    # -- the steps

    def run(self) -> dict:
        """Build (or finish building) the store; returns the report."""
        if (self.out / MANIFEST).is_file():
            raise DelvmError(f"{self.out}: already a finished store; choose a new `out` folder")
        self._claim()
        start = time.perf_counter()
        done = len(list(self.work.glob("*/*.json")))
        if done and self.is_main:
            print(f"resuming {self.out}: {done} finished shards kept")
        base = self._pass("base", range(len(self.config.sources)), {}, None)
        self._check(base)
        copies = self.copies(base.counts)
        tails = [i for i, s in enumerate(base.sources) if any(copies[t] for t in s.examples)]
        self._pass("copies", tails, copies, sum(base.counts[t] for t in copies if copies[t]))
        report = self.report(base, copies)
        if self.is_main:
            self._wait_for_shards(base.counts, copies)
            self._assemble(base, copies, report)
            shutil.rmtree(self.work)
        report["seconds"] = {
            "total": time.perf_counter() - start,
            "encode": self.encode_seconds,
        }
        return report

    def _claim(self) -> None:
        """Record what is being built; a resumed build must be the same build."""
        plan = {"config": asdict(self.config), "tokenizer": self.identity()}
        plan["config"].pop("out")
        plan = json.loads(json.dumps(plan))  # tuples compare as the lists JSON gives back
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / "plan.json"
        if path.is_file():
            if read_json(path) != plan:
                raise DelvmError(
                    f"{self.out}: an unfinished build with a different config or tokenizer is "
                    f"here; rerun it with the same ones, or delete {self.work} to start over"
                )
        else:
            write_json(path, plan)

    def identity(self) -> dict:
        return {
            **tokenizer_identity(self.tokenizer),
            "config": self.tokenizer.config.to_dict(),
            "path": self.config.tokenizer,
        }

    def _items(self, index: int) -> Iterator[Example | Skipped]:
        """Source `index`'s items; examples the store cannot hold become Skipped."""
        spec = dict(self.config.sources[index])
        fmt = spec.pop("format")
        try:
            items = SOURCES[fmt](**spec)
        except TypeError as err:
            raise DelvmError(f"build config sources[{index}] ({fmt}): {err}") from None
        for item in items:
            if isinstance(item, Example):
                item = self._validate(item)
            yield item

    def _validate(self, example: Example) -> Example | Skipped:
        if not TASK_NAME.fullmatch(example.task):
            raise DelvmError(
                f"task name {example.task!r} (from {example.source}): use letters, digits, _ . -"
            )
        count = self.images_per_example.setdefault(example.task, len(example.images))
        if len(example.images) != count:
            return Skipped(
                example.source,
                f"{len(example.images)} images, but task {example.task} has {count} per example",
            )
        if len({image.shape for image in example.images}) != 1:
            return Skipped(example.source, "images of the example differ in size")
        return example

    def _pass(
        self, kind: str, sources: Iterable[int], copies: dict[str, int], total: int | None
    ) -> PassResult:
        """One pass over `sources`: this rank's unfinished shards of `kind` get built.

        kind "base": copy 0 of every example; "copies": copies 1..N of tail-task examples.
        Every rank reads every source (sources are sequential), but only encodes its shards.
        """
        result, writers = PassResult(), {}
        bar = tqdm(total=total, desc=f"{kind} examples", unit="ex", disable=not self.is_main)
        for index in sources:
            stats = SourceStats()
            result.sources.append(stats)
            for item in self._items(index):
                if isinstance(item, Skipped):
                    stats.skipped.append({"file": item.source, "reason": item.reason})
                    continue
                task = item.task
                origin = result.counts.get(task, 0)
                result.counts[task] = origin + 1
                stats.examples[task] = stats.examples.get(task, 0) + 1
                result.origins.setdefault(task, []).append(item.source)
                if kind == "copies" and not copies[task]:
                    continue
                bar.update()
                number = origin // self.config.shard_size
                stem = self.work / task / f"{kind}-{number:06d}"
                if not self._mine(task, number) or stem.with_suffix(".json").exists():
                    continue
                writer = writers.setdefault(
                    (task, number), ShardWriter(stem, self._encode, self.config.batch_size)
                )
                writer.add(origin, self._rows(kind, item, origin, copies))
                if writer.originals == self.config.shard_size:
                    writer.finish()
                    del writers[(task, number)]
        for writer in writers.values():  # each task's last, partly filled shard
            writer.finish()
        bar.close()
        return result

    def _rows(
        self, kind: str, example: Example, origin: int, copies: dict[str, int]
    ) -> Iterator[tuple[int, Example]]:
        """(copy index, image-size example) pairs made from one original example."""
        if kind == "base":
            yield 0, resize_example(example, self.size)
            return
        for copy in range(1, copies[example.task] + 1):
            seed = copy_seed(self.config.seed, example.task, origin, copy)
            yield copy, augment_example(example, self._augment(example.task), seed)

    def _augment(self, task: str) -> AugmentConfig:
        if task not in self.augment:
            self.augment[task] = self.config.augment_config(task, self.size)
        return self.augment[task]

    def _mine(self, task: str, number: int) -> bool:
        """Shards go round-robin over ranks, each task starting at its own rank."""
        return (number + zlib.crc32(task.encode())) % self.shard.world_size == self.shard.rank

    def _encode(self, examples: list[list[np.ndarray]]) -> np.ndarray:
        start = time.perf_counter()
        images = torch.from_numpy(np.stack([image for ex in examples for image in ex]))
        ids = self.tokenizer.encode(images, bf16=self.config.bf16)
        self.encode_seconds += time.perf_counter() - start
        return ids.cpu().numpy().astype(self.dtype).reshape(len(examples), len(examples[0]), -1)

    def _check(self, base: PassResult) -> None:
        """A source with no usable example, or a configured task no source has, is an error."""
        for index, stats in enumerate(base.sources):
            if not stats.examples:
                spec = self.config.sources[index]
                first = stats.skipped[0] if stats.skipped else None
                why = f"e.g. {first['file']}: {first['reason']}" if first else "it yielded nothing"
                raise DelvmError(
                    f"build config sources[{index}] ({spec['format']}): no usable examples "
                    f"({len(stats.skipped)} skipped; {why}); fix its settings or files"
                )
        missing = sorted(set(self.config.tasks) - set(base.counts))
        if missing:
            raise DelvmError(
                f"build config tasks {missing}: no source yields them; fix the sources' `task`"
            )

    def copies(self, counts: dict[str, int]) -> dict[str, int]:
        """Augmented copies per example of each task (0 unless balance is `augment`)."""
        if self.config.balance != "augment":
            return {task: 0 for task in counts}
        tokens = {t: n * self.images_per_example[t] for t, n in counts.items()}
        largest = max(tokens.values())
        out = {}
        for task, n in tokens.items():
            auto = min(self.config.max_copies, max(0, round(largest / n) - 1))
            out[task] = self.config.tasks.get(task, {}).get("copies", auto)
        return out

    def report(self, base: PassResult, copies: dict[str, int]) -> dict:
        per_image = self.grid**2
        tasks = {}
        for task in sorted(base.counts):
            n, ipe = base.counts[task], self.images_per_example[task]
            rows = n * (1 + copies[task])
            tasks[task] = {
                "examples": n,
                "images_per_example": ipe,
                "copies": copies[task],
                "rows": rows,
                "tokens_before": n * ipe * per_image,
                "tokens_after": rows * ipe * per_image,
            }
        sources = [
            {"source": self.config.sources[i], **asdict(stats)}
            for i, stats in enumerate(base.sources)
        ]
        return {"balance": self.config.balance, "tasks": tasks, "sources": sources}

    def _expected(self, counts: dict[str, int], copies: dict[str, int]) -> list[Path]:
        paths = []
        for task, n in sorted(counts.items()):
            kinds = ["base", "copies"] if copies[task] else ["base"]
            for kind in kinds:
                for number in range(math.ceil(n / self.config.shard_size)):
                    paths.append(self.work / task / f"{kind}-{number:06d}.json")
        return paths

    def _wait_for_shards(self, counts: dict[str, int], copies: dict[str, int]) -> None:
        """Rank 0 waits on the files themselves: shard work is uneven and can outlast a
        collective's timeout; torchrun stops every rank if one fails."""
        expected = self._expected(counts, copies)
        waited = False
        while missing := [p for p in expected if not p.exists()]:
            if not waited:
                print(f"waiting for {len(missing)} shards from other ranks")
                waited = True
            time.sleep(0.5)

    def _assemble(self, base: PassResult, copies: dict[str, int], report: dict) -> None:
        infos = {}
        for task in sorted(base.counts):
            stems = [p.with_suffix("") for p in self._expected({task: base.counts[task]}, copies)]
            chunks, rows = [], []
            for stem in stems:
                meta = read_json(stem.with_suffix(".json"))
                npy = stem.with_suffix(".npy")
                if sha256_file(npy) != meta["sha256"]:
                    raise DelvmError(
                        f"{npy}: shard changed since it was written; delete it and its .json, "
                        "then rerun the build"
                    )
                chunks.append(_load_npy(npy))
                rows.extend(meta["rows"])
            rows = np.array(rows, dtype=np.int64).reshape(-1, 2)
            _write_task(self.out, task, chunks, rows, base.origins[task], self.dtype)
            infos[task] = _task_info(rows, self.images_per_example[task], base.counts[task])
        write_json(self.out / REPORT, report)
        build = {"sources": self.config.sources, "image_size": self.size, "seed": self.config.seed}
        _write_manifest(self.out, self.identity(), self.config.balance, infos, build)


def build_store(config: BuildConfig, device: str | torch.device = "cpu") -> dict:
    """Build the store `config` describes (resuming an unfinished one); returns the report."""
    shard = Shard.from_env()
    tokenizer = load_tokenizer(config.tokenizer, device)
    return Builder(config, tokenizer, shard).run()


def format_report(report: dict) -> str:
    """The build report as a table per task, then skipped files per source."""
    head = ("task", "examples", "images", "copies", "rows", "tokens before", "tokens after")
    lines = [head]
    for task, t in report["tasks"].items():
        lines.append(
            (task, f"{t['examples']:,}", str(t["images_per_example"]), str(t["copies"]),
             f"{t['rows']:,}", f"{t['tokens_before']:,}", f"{t['tokens_after']:,}")
        )  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = [
        "  ".join(
            [row[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        )
        for row in lines
    ]
    for index, source in enumerate(report["sources"]):
        skipped = source["skipped"]
        examples = ", ".join(f"{t} {n:,}" for t, n in source["examples"].items())
        text.append(
            f"sources[{index}] {source['source']['format']}: {examples}; {len(skipped)} skipped"
        )
        text.extend(f"  skipped {s['file']}: {s['reason']}" for s in skipped[:5])
        if len(skipped) > 5:
            text.append(f"  ... {len(skipped) - 5} more in report.json")
    return "\n".join(text)
