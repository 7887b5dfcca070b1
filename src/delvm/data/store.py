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

`delvm data build CONFIG` (see `BuildConfig`, `Builder`) works in shards: fixed-size runs of a
source's units (files or records), each written atomically with its checksum into STORE/.build/.
Under torchrun, each rank lists every source but reads, decodes and encodes only its own shards;
within a rank, DataLoader worker processes decode while the rank encodes; rank 0 assembles. A
killed build continues at the unfinished shards; finished shards are never rewritten. The store
is byte-identical whatever the number of ranks and workers, and whether the build was killed.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import shutil
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from delvm.configs import find_config
from delvm.data.augment import AugmentConfig, augment_example, resize_example
from delvm.data.example import Example, Skipped
from delvm.data.sources import SOURCES, open_source
from delvm.data.sources.common import Source, example_seed, unit_path
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
        tokens = arrays.tokens
        _write_task(folder, name, [tokens], tokens.shape, arrays.rows, arrays.sources, dtype)
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
    chunks: Iterable[np.ndarray],
    shape: tuple[int, int, int],
    rows: np.ndarray,
    sources: list[str],
    dtype: np.dtype,
) -> None:
    """TASK.tokens.npy of `shape` from `chunks` (stacked in order, streamed), TASK.rows.npy,
    TASK.origins.json."""
    if shape[0] != len(rows):
        raise ValueError(f"task {name}: {shape[0]} token rows but {len(rows)} row records")

    def write_tokens(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        start = 0
        for chunk in chunks:
            out[start : start + len(chunk)] = chunk
            start += len(chunk)
        if start != shape[0]:
            raise ValueError(f"task {name}: {start} token rows written, {shape[0]} expected")
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
    shard_size: units per shard (files or records of one source: an image pair, an SA-1B
        JSON, a COCO image, a video); shards are the unit of resume and of work per rank.
    batch_size: examples per encoder call.
    workers: decoding processes per rank (0: decode in the rank's own process). Neither this
        nor the number of ranks changes the store, so a resumed build may use others.
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
    workers: int = 0
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
        if self.max_copies < 0 or self.image_size < 0 or self.workers < 0:
            raise DelvmError("build config max_copies, image_size and workers must be >= 0")
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


@dataclass(frozen=True)
class ShardSpec:
    """Units start..stop of source `source`: the unit of resume and of work per rank."""

    number: int  # over all sources, in source order
    source: int
    start: int
    stop: int


# One unit's work: (source index, unit, picks). picks is None in the base pass; in the copies
# pass, (position of the example among the unit's items, its source, task, origin id, copies to
# make) for each example of a tail task.
Job = tuple[int, Any, list[tuple[int, str, str, int, int]] | None]


class Decoder(Dataset):
    """Jobs -> image-size examples: reading, rendering, resizing and augmentation, the work a
    rank's DataLoader workers do while the rank encodes. Job i gives one list of records:

    base pass:   ("skip", {"file", "reason"}, None) or
                 ("example", {"task", "source", "images"}, uint8 [images, size, size, 3])
    copies pass: ("copy", [task, origin, copy], uint8 [images, size, size, 3])

    A unit whose reading raises anything is one "skip" record naming the error: one bad file
    never stops a build. Every random draw is seeded by the example's identity, so the records
    do not depend on which process made them.
    """

    def __init__(
        self,
        sources: list[Source],
        jobs: list[Job],
        size: int,
        augment: dict[str, AugmentConfig],
        seed: int,
    ):
        # Readers without their unit lists: a worker touches only the units of its jobs.
        self.sources = [replace(source, units=[]) for source in sources]
        self.jobs, self.size, self.augment, self.seed = jobs, size, augment, seed

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> list[tuple]:
        source, unit, picks = self.jobs[index]
        items = self.sources[source].read_unit(unit)
        try:
            return self._base(items) if picks is None else self._copies(items, picks)
        except DelvmError as err:  # says what is wrong (in _copies: what changed since then)
            return [("skip", {"file": unit_path(unit), "reason": str(err)}, None)]
        except Exception as err:  # any failure while reading one unit is that unit's
            why = " ".join(f"{type(err).__name__}: {err}".split())
            reason = f"unexpected error reading it ({why})"
            return [("skip", {"file": unit_path(unit), "reason": reason}, None)]

    def _base(self, items: Iterator[Example | Skipped]) -> list[tuple]:
        records = []
        for item in items:
            if isinstance(item, Skipped):
                records.append(("skip", {"file": item.source, "reason": item.reason}, None))
            elif len({image.shape for image in item.images}) != 1:
                reason = "images of the example differ in size"
                records.append(("skip", {"file": item.source, "reason": reason}, None))
            else:
                meta = {"task": item.task, "source": item.source, "images": len(item.images)}
                images = np.stack(resize_example(item, self.size).images)
                records.append(("example", meta, images))
        return records

    def _copies(self, items: Iterator[Example | Skipped], picks: list) -> list[tuple]:
        wanted = {position: pick for position, *pick in picks}
        records = []
        for position, item in enumerate(items):
            if position not in wanted:
                continue
            source, task, origin, copies = wanted.pop(position)
            if isinstance(item, Skipped):
                raise DelvmError(item.reason)
            if item.source != source:
                raise DelvmError(f"gives example {item.source} where {source} was")
            for copy in range(1, copies + 1):
                seed = copy_seed(self.seed, task, origin, copy)
                images = np.stack(augment_example(item, self.augment[task], seed).images)
                records.append(("copy", [task, origin, copy], images))
            if not wanted:
                break
        if wanted:
            raise DelvmError("gives fewer examples")
        return records


def _as_is(records: list[tuple]) -> list[tuple]:
    return records  # the DataLoader's collate step: records stay as the Decoder made them


class ShardWriter:
    """One shard: examples' images in, tokens out, `batch_size` examples per encoder call.

    Written atomically, the array [images, h*w] before its JSON, so a shard whose JSON exists is
    complete. Batches never cross shards: a shard's tokens do not depend on who encoded it.
    """

    def __init__(
        self,
        stem: Path,
        encode: Callable[[np.ndarray], np.ndarray],
        batch_size: int,
        empty: np.ndarray,
    ):
        self.stem, self.encode, self.batch_size = stem, encode, batch_size
        self.pending: list[np.ndarray] = []  # [images, S, S, 3] per example
        self.tokens: list[np.ndarray] = [empty]

    def add(self, images: np.ndarray) -> None:
        self.pending.append(images)
        if len(self.pending) == self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.tokens.append(self.encode(np.concatenate(self.pending)))
            self.pending = []

    def finish(self, meta: dict) -> None:
        self._flush()
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        npy = self.stem.with_suffix(".npy")
        _save_npy(npy, np.concatenate(self.tokens))
        write_json(self.stem.with_suffix(".json"), {**meta, "sha256": sha256_file(npy)})


@dataclass
class SourceStats:
    """What one configured source gave in the base pass."""

    examples: dict[str, int] = field(default_factory=dict)  # task -> examples
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}


@dataclass
class Plan:
    """The base pass read back from its shards, in shard order (the same in every rank)."""

    counts: dict[str, int] = field(default_factory=dict)  # task -> original examples
    images_per_example: dict[str, int] = field(default_factory=dict)
    sources: list[SourceStats] = field(default_factory=list)
    before: list[dict[str, int]] = field(default_factory=list)  # per shard: task -> examples
    origins: dict[str, list[str]] = field(default_factory=dict)  # rank 0 only: task -> sources

    def kept(self, item: dict) -> bool:
        """An example (not a skip) with as many images as its task's first example."""
        return "task" in item and item["images"] == self.images_per_example[item["task"]]


class Builder:
    """Sources -> resized (and augmented) examples -> tokens -> shards -> the store.

    Two passes over shards of units: "base" (every example, resized) and, once every rank has
    finished it, "copies" (augmented copies of tail-task examples, whose number depends on every
    task's count). Each rank takes every world_size-th shard; within a rank the Decoder's work
    runs in `config.workers` DataLoader processes while the rank encodes. Rank 0 assembles.
    """

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
        config.augment_config("", self.size)  # every augmentation setting checked now
        for task in config.tasks:
            config.augment_config(task, self.size)

    @property
    def is_main(self) -> bool:
        return self.shard.rank == 0

    # -- the steps

    def run(self) -> dict:
        """Build (or finish building) the store; returns the report."""
        if (self.out / MANIFEST).is_file():
            raise DelvmError(f"{self.out}: already a finished store; choose a new `out` folder")
        start = time.perf_counter()
        self.sources = [self._list(index) for index in range(len(self.config.sources))]
        self.shards = self._shards()
        self._claim()
        done = len(list(self.work.glob("*/*.json")))
        if done and self.is_main:
            print(f"resuming {self.out}: {done} finished shards kept")
        self._pass("base", self._base_jobs)
        self._sync()
        plan = self._plan()
        self._check(plan)
        copies = self.copies(plan)
        self._pass("copies", lambda shard: self._copy_jobs(shard, plan, copies))
        self._sync()
        report = self.report(plan, copies)
        if self.is_main:
            self._assemble(plan, copies, report)
            shutil.rmtree(self.work)
        report["seconds"] = {"total": time.perf_counter() - start, "encode": self.encode_seconds}
        return report

    def _list(self, index: int) -> Source:
        try:
            return open_source(self.config.sources[index])
        except DelvmError as err:
            raise DelvmError(f"build config sources[{index}]: {err}") from None

    def _shards(self) -> list[ShardSpec]:
        shards, size = [], self.config.shard_size
        for index, source in enumerate(self.sources):
            for start in range(0, len(source.units), size):
                stop = min(start + size, len(source.units))
                shards.append(ShardSpec(len(shards), index, start, stop))
        return shards

    def _claim(self) -> None:
        """Record what is being built; a resumed build must be the same build, of the same files."""
        config = asdict(self.config)
        for key in ("out", "workers"):  # neither changes the store
            config.pop(key)
        plan = {
            "config": config,
            "tokenizer": self.identity(),
            "units": [len(source.units) for source in self.sources],
        }
        plan = json.loads(json.dumps(plan))  # tuples compare as the lists JSON gives back
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / "plan.json"
        if not path.is_file():
            write_json(path, plan)
            return
        claimed = read_json(path)
        same_config = {**claimed, "units": None} == {**plan, "units": None}
        if same_config and claimed["units"] != plan["units"]:
            raise DelvmError(
                f"{self.out}: the sources now list {plan['units']} files or records, the "
                f"unfinished build listed {claimed['units']}; restore the files, or delete "
                f"{self.work} to start over"
            )
        if claimed != plan:
            raise DelvmError(
                f"{self.out}: an unfinished build with a different config or tokenizer is "
                f"here; rerun it with the same ones, or delete {self.work} to start over"
            )

    def identity(self) -> dict:
        return {
            **tokenizer_identity(self.tokenizer),
            "config": self.tokenizer.config.to_dict(),
            "path": self.config.tokenizer,
        }

    def _mine(self, shard: ShardSpec) -> bool:
        return shard.number % self.shard.world_size == self.shard.rank

    def _stem(self, kind: str, shard: ShardSpec) -> Path:
        return self.work / kind / f"{shard.number:06d}"

    def _meta(self, kind: str, shard: ShardSpec) -> dict:
        return read_json(self._stem(kind, shard).with_suffix(".json"))

    def _sync(self) -> None:
        """Every rank waits here for the others (a no-op in a world of one)."""
        if self.shard.world_size > 1:
            dist.barrier()

    def _pass(self, kind: str, jobs_of: Callable[[ShardSpec], list[Job]]) -> None:
        """This rank's unfinished shards of `kind`: decoded in workers, encoded here, written."""
        done = {p.stem for p in (self.work / kind).glob("*.json")}
        todo = [s for s in self.shards if self._mine(s) and self._stem(kind, s).name not in done]
        jobs = {shard.number: jobs_of(shard) for shard in todo}
        todo = [shard for shard in todo if jobs[shard.number]]
        if not todo:
            return
        decoder = Decoder(
            self.sources,
            [job for shard in todo for job in jobs[shard.number]],
            self.size,
            {task: self.config.augment_config(task, self.size) for task in self._tasks(jobs)},
            self.config.seed,
        )
        loader = DataLoader(
            decoder, batch_size=None, num_workers=self.config.workers, collate_fn=_as_is
        )
        # Workers fork from here and share this process's objects; frozen, the collector in a
        # worker leaves them (and their memory pages) alone instead of copying them all.
        gc.freeze()
        results = iter(loader)
        gc.unfreeze()
        bar = tqdm(total=len(decoder), desc=f"{kind} units", unit="unit", disable=not self.is_main)
        empty = np.zeros((0, self.grid**2), self.dtype)
        for shard in todo:
            stem = self._stem(kind, shard)
            writer = ShardWriter(stem, self._encode, self.config.batch_size, empty)
            units, rows = [], []
            for _ in jobs[shard.number]:
                items = []
                for record, meta, images in next(results):
                    if kind == "copies" and record == "skip":
                        raise DelvmError(
                            f"{meta['file']}: changed since the base pass read it "
                            f"({meta['reason']}); restore it, or delete {self.work} to start over"
                        )
                    if record == "example" and not TASK_NAME.fullmatch(meta["task"]):
                        raise DelvmError(
                            f"task name {meta['task']!r} (from {meta['source']}): use letters, "
                            "digits, _ . -"
                        )
                    (rows if kind == "copies" else items).append(meta)
                    if images is not None:
                        writer.add(images)
                units.append(items)
                bar.update()
            writer.finish({"units": units} if kind == "base" else {"rows": rows})
        bar.close()

    def _base_jobs(self, shard: ShardSpec) -> list[Job]:
        units = self.sources[shard.source].units[shard.start : shard.stop]
        return [(shard.source, unit, None) for unit in units]

    @staticmethod
    def _tasks(jobs: dict[int, list[Job]]) -> set[str]:
        """The tasks the copies jobs augment."""
        picks = [pick for shard_jobs in jobs.values() for *_, unit_picks in shard_jobs
                 for pick in unit_picks or []]  # fmt: skip
        return {task for _, _, task, _, _ in picks}

    def _encode(self, images: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        ids = self.tokenizer.encode(torch.from_numpy(images), bf16=self.config.bf16)
        self.encode_seconds += time.perf_counter() - start
        return ids.cpu().numpy().astype(self.dtype)

    def _plan(self) -> Plan:
        """Counts, images per example and each shard's first origin ids, from the base shards."""
        plan = Plan(sources=[SourceStats() for _ in self.sources])
        for shard in self.shards:
            plan.before.append(dict(plan.counts))
            stats = plan.sources[shard.source]
            for items in self._meta("base", shard)["units"]:
                for item in items:
                    if "task" not in item:
                        stats.skipped.append(item)
                        continue
                    task, images = item["task"], item["images"]
                    expected = plan.images_per_example.setdefault(task, images)
                    if images != expected:
                        reason = f"{images} images, but task {task} has {expected} per example"
                        stats.skipped.append({"file": item["source"], "reason": reason})
                        continue
                    plan.counts[task] = plan.counts.get(task, 0) + 1
                    stats.examples[task] = stats.examples.get(task, 0) + 1
                    if self.is_main:
                        plan.origins.setdefault(task, []).append(item["source"])
        return plan

    def _copy_jobs(self, shard: ShardSpec, plan: Plan, copies: dict[str, int]) -> list[Job]:
        """The units of `shard` holding tail-task examples, each with its examples' picks."""
        if not any(copies.values()):
            return []
        seen, jobs = dict(plan.before[shard.number]), []
        units = self.sources[shard.source].units[shard.start : shard.stop]
        for unit, items in zip(units, self._meta("base", shard)["units"], strict=True):
            picks = []
            for position, item in enumerate(items):
                if not plan.kept(item):
                    continue
                task = item["task"]
                origin = seen.get(task, 0)
                seen[task] = origin + 1
                if copies[task]:
                    picks.append((position, item["source"], task, origin, copies[task]))
            if picks:
                jobs.append((shard.source, unit, picks))
        return jobs

    def _check(self, plan: Plan) -> None:
        """A source with no usable example, or a configured task no source has, is an error."""
        for index, stats in enumerate(plan.sources):
            if not stats.examples:
                spec = self.config.sources[index]
                first = stats.skipped[0] if stats.skipped else None
                why = f"e.g. {first['file']}: {first['reason']}" if first else "it yielded nothing"
                raise DelvmError(
                    f"build config sources[{index}] ({spec['format']}): no usable examples "
                    f"({len(stats.skipped)} skipped; {why}); fix its settings or files"
                )
        missing = sorted(set(self.config.tasks) - set(plan.counts))
        if missing:
            raise DelvmError(
                f"build config tasks {missing}: no source yields them; fix the sources' `task`"
            )

    def copies(self, plan: Plan) -> dict[str, int]:
        """Augmented copies per example of each task (0 unless balance is `augment`)."""
        if self.config.balance != "augment":
            return {task: 0 for task in plan.counts}
        tokens = {t: n * plan.images_per_example[t] for t, n in plan.counts.items()}
        largest = max(tokens.values())
        out = {}
        for task, n in tokens.items():
            auto = min(self.config.max_copies, max(0, round(largest / n) - 1))
            out[task] = self.config.tasks.get(task, {}).get("copies", auto)
        return out

    def report(self, plan: Plan, copies: dict[str, int]) -> dict:
        per_image = self.grid**2
        tasks = {}
        for task in sorted(plan.counts):
            n, ipe = plan.counts[task], plan.images_per_example[task]
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
            for i, stats in enumerate(plan.sources)
        ]
        return {"balance": self.config.balance, "tasks": tasks, "sources": sources}

    def _tokens(self, kind: str, shard: ShardSpec, meta: dict) -> np.ndarray:
        npy = self._stem(kind, shard).with_suffix(".npy")
        if sha256_file(npy) != meta["sha256"]:
            raise DelvmError(
                f"{npy}: shard changed since it was written; delete it and its .json, then "
                "rerun the build"
            )
        return _load_npy(npy)

    def _task_rows(self, task: str, plan: Plan, copies: dict[str, int]) -> Iterator[np.ndarray]:
        """The task's token rows in store order: originals, then each original's copies."""
        ipe, n = plan.images_per_example[task], plan.counts[task]

        def gather(tokens: np.ndarray, starts: list[int]) -> np.ndarray:
            index = (np.asarray(starts)[:, None] + np.arange(ipe)).reshape(-1)
            return tokens[index].reshape(len(starts), ipe, -1)

        for shard in self.shards:
            meta, starts, offset = self._meta("base", shard), [], 0
            for item in (item for items in meta["units"] for item in items if "task" in item):
                if plan.kept(item) and item["task"] == task:
                    starts.append(offset)
                offset += item["images"]
            if starts:
                yield gather(self._tokens("base", shard, meta), starts)
        if not copies[task]:
            return
        expected = ((origin, copy) for origin in range(n) for copy in range(1, copies[task] + 1))
        for shard in self.shards:
            if not self._copy_jobs(shard, plan, copies):
                continue
            meta, starts, offset = self._meta("copies", shard), [], 0
            for row_task, origin, copy in meta["rows"]:
                if row_task == task:
                    if (origin, copy) != next(expected):
                        raise DelvmError(
                            f"{self._stem('copies', shard)}.json: rows out of order; delete "
                            f"{self.work} and rebuild"
                        )
                    starts.append(offset)
                offset += plan.images_per_example[row_task]
            if starts:
                yield gather(self._tokens("copies", shard, meta), starts)

    def _assemble(self, plan: Plan, copies: dict[str, int], report: dict) -> None:
        infos = {}
        for task in sorted(plan.counts):
            n, ipe, extra = plan.counts[task], plan.images_per_example[task], copies[task]
            rows = np.array(
                [(o, 0) for o in range(n)]
                + [(o, c) for o in range(n) for c in range(1, extra + 1)],
                dtype=np.int64,
            ).reshape(-1, 2)
            shape = (len(rows), ipe, self.grid**2)
            chunks = self._task_rows(task, plan, copies)
            _write_task(self.out, task, chunks, shape, rows, plan.origins[task], self.dtype)
            infos[task] = _task_info(rows, ipe, n)
        write_json(self.out / REPORT, report)
        build = {"sources": self.config.sources, "image_size": self.size, "seed": self.config.seed}
        _write_manifest(self.out, self.identity(), self.config.balance, infos, build)


def build_store(config: BuildConfig, device: str | torch.device = "cpu") -> dict:
    """Build the store `config` describes (resuming an unfinished one); returns the report.

    Under torchrun, every rank runs this; they meet at a gloo barrier between the passes.
    """
    shard = Shard.from_env()
    tokenizer = load_tokenizer(config.tokenizer, device)
    joined = shard.world_size > 1 and not dist.is_initialized()
    if joined:  # a pass can take hours: the barrier must not time out before the slowest rank
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        return Builder(config, tokenizer, shard).run()
    finally:
        if joined:
            dist.destroy_process_group()


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
