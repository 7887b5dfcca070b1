"""Visual sentences from a token store: k examples of one task, concatenated, balanced, seeded.

A sentence is (input_1, output_1, ..., input_k, output_k) token by token, k examples of ONE task,
k = seq_len // (images per example x tokens per image), composed at load time so one store serves
any context. Each sentence is a pure function of the seed and its address (step, micro-batch, row
for training; task and number for validation): resuming at a step replays exactly what an
uninterrupted run would see, and data-parallel ranks, which take different rows, never share one.

The task of a training sentence is drawn by weight:
    none      proportional to the task's stored tokens of original examples (natural mix)
    resample  equal for every task; tail-task examples repeat more often
    augment   equal for every task, as `resample`; each drawn example is a random one of its
              stored copies (the augmented copies `delvm data build` made, needs a store built
              with balance = "augment"), so a tail task repeats fewer identical examples
and `task_weights` multiply those weights per task (a target share per task). `resample` and
`augment` therefore train on the same task mix and differ only in diversity: where more draws
are needed than copies were stored, the copies repeat. Every sentence has the same number of
tokens, so a task's share of sentences is its share of tokens. Within a task, k distinct original
examples are drawn uniformly (repeats only when the task has fewer than k), each as a random one
of its stored copies under `augment`, else as copy 0.

The held-out split is by original example: a validation example's copies never reach training.
Validation sentences use copy 0 of validation examples only and are fixed by the seed. A task
given a validation store of its own (`val_stores`, e.g. pose validated on MPII as in the paper)
trains on every example of the training store and validates on every example of that store.

Noisy teacher forcing (`answer_noise` > 0, training sentences only): in what the model reads, the
output image (last image) of every example after the first has a share r ~ U(0, answer_noise) of
its codes replaced by random codes, r drawn per example; the labels keep the true codes. With
clean teacher forcing an answer's own first codes give its task away, so the example pairs are
barely needed to lower the loss; with noisy answers the model has to read the task from the
examples and the answer's layout from the query.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from delvm.data.store import BALANCE_MODES, TaskTokens, TokenStore, open_store
from delvm.errors import DelvmError

# Separate random streams for the split, training sentences and validation sentences.
SPLIT, TRAIN, VAL = 0, 1, 2


@dataclass(frozen=True)
class SamplerConfig:
    """Field names match the trainer's [data] section (`delvm.train.config.DataSection`)."""

    seq_len: int = 2048  # the context; each sentence fills it with whole examples
    balance: str = "augment"  # none | resample | augment
    task_weights: dict = field(default_factory=dict)  # task -> weight multiplier
    val_fraction: float = 0.05  # held-out share of each task's original examples
    val_sentences: int = 16  # fixed validation sentences per task
    seed: int = 0
    answer_noise: float = 0.0  # noisy teacher forcing: the most any answer's input is replaced

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise DelvmError(f"data balance = {self.balance!r}: use one of {BALANCE_MODES}")
        if not 0 <= self.val_fraction < 1:
            raise DelvmError(f"data val_fraction = {self.val_fraction}: use 0 <= value < 1")
        if any(w < 0 for w in self.task_weights.values()):
            raise DelvmError(f"data task_weights {self.task_weights}: weights must be >= 0")
        if not 0 <= self.answer_noise <= 1:
            raise DelvmError(f"data answer_noise = {self.answer_noise}: use a share in [0, 1]")


def open_val_stores(paths: dict[str, str], fingerprint: str | None) -> dict[str, TokenStore]:
    """``data.val_stores`` (task -> store folder) opened, each store once however many tasks
    name it; ``fingerprint``: the run's tokenizer, as `open_store` checks it."""
    opened = {path: open_store(path, fingerprint=fingerprint) for path in set(paths.values())}
    return {task: opened[path] for task, path in paths.items()}


class SentenceBatch(NamedTuple):
    ids: Tensor  # [batch, seq] int64 token ids
    tasks: list[str]  # the task of each row
    # [batch, seq - 1] what the model reads, when it is not ids[:, :-1] (answer noise)
    inputs: Tensor | None = None


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


@dataclass(frozen=True)
class Pool:
    """The rows one side of the split may draw from, grouped by original example."""

    origins: np.ndarray  # original example ids in this pool, ascending
    rows: np.ndarray  # row ids, grouped by origin
    starts: np.ndarray  # [origins] where each origin's rows begin in `rows`
    counts: np.ndarray  # [origins] how many rows each origin has

    @classmethod
    def of(cls, task: TaskTokens, origins: np.ndarray, all_copies: bool) -> Pool:
        keep = np.isin(task.origin, origins)
        if not all_copies:
            keep &= task.copy == 0
        rows = np.flatnonzero(keep)
        rows = rows[np.argsort(task.origin[rows], kind="stable")]
        ids, starts, counts = np.unique(task.origin[rows], return_index=True, return_counts=True)
        return cls(ids, rows, starts, counts)

    def draw(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """Rows of k different original examples (with repeats only if there are fewer)."""
        n = len(self.origins)
        picks = rng.choice(n, size=k, replace=n < k)
        offsets = (rng.random(k) * self.counts[picks]).astype(np.int64)
        return self.rows[self.starts[picks] + offsets]


class SentenceSampler:
    """Sentences from a store; implements the trainer's `SentenceSource`."""

    def __init__(
        self,
        store: TokenStore,
        config: SamplerConfig,
        codebook: Tensor | None = None,
        val_stores: dict[str, TokenStore] | None = None,
    ):
        if config.balance == "augment" and store.balance != "augment":
            raise DelvmError(
                f"{store.path}: built with balance = {store.balance!r}, so it holds no augmented "
                "copies; rebuild it with balance = 'augment', or sample with 'none' or 'resample'"
            )
        unknown = sorted(set(config.task_weights) - set(store.tasks))
        if unknown:
            raise DelvmError(
                f"data task_weights: {unknown} not in the store ({sorted(store.tasks)})"
            )
        self.store, self.config, self._codebook = store, config, codebook
        self.tasks = sorted(store.tasks)
        self.image_tokens = store.tokens_per_image
        self.vocab_size = store.num_codes
        self.tokenizer_fingerprint = store.fingerprint
        self.examples_per_sentence = {t: self._k(t) for t in self.tasks}
        self.sentence_tokens = self._sentence_tokens()
        self.val_stores = dict(val_stores or {})
        self._check_val_stores()
        self.train, self.val = {}, {}
        self.val_tokens: dict[str, TaskTokens] = {}  # the rows `self.val[task]` points into
        for name in self.tasks:
            task = store.tasks[name]
            if name in self.val_stores:
                train = np.arange(task.num_examples)
                outside = self.val_stores[name].tasks[name]
                self.val[name] = Pool.of(outside, np.arange(outside.num_examples), all_copies=False)
                self.val_tokens[name] = outside
            else:
                train, val = self.split(name)
                self.val[name] = Pool.of(task, val, all_copies=False)
                self.val_tokens[name] = task
            self.train[name] = Pool.of(task, train, all_copies=config.balance == "augment")
        self.weights = {t: self._weight(t) for t in self.tasks}
        self._val_cache: dict[int, list[SentenceBatch]] = {}

    def _check_val_stores(self) -> None:
        """Each validation store holds its task, tokenized as the training store is."""
        for name, other in self.val_stores.items():
            where = f"data.val_stores.{name} = {str(other.path)!r}"
            if name not in self.store.tasks:
                raise DelvmError(
                    f"{where}: {name!r} is not a task of the training store {self.store.path} "
                    f"({', '.join(self.tasks)})"
                )
            if name not in other.tasks:
                raise DelvmError(
                    f"{where}: that store holds no task {name!r} ({', '.join(sorted(other.tasks))})"
                    f"; build it with task = {name!r}"
                )
            same = (other.fingerprint, other.tokens_per_image, other.num_codes) == (
                self.store.fingerprint, self.image_tokens, self.vocab_size,
            )  # fmt: skip
            if not same:
                raise DelvmError(
                    f"{where}: tokenized with another tokenizer than {self.store.path}; build "
                    "both with the same one"
                )
            if other.tasks[name].images_per_example != self.store.tasks[name].images_per_example:
                raise DelvmError(
                    f"{where}: {other.tasks[name].images_per_example} images per example, the "
                    f"training store's {name} has {self.store.tasks[name].images_per_example}"
                )

    def val_source(self, name: str) -> str:
        """Where a task's validation examples come from: its store, or the held-out split."""
        if name in self.val_stores:
            return str(self.val_stores[name].path)
        return f"{self.config.val_fraction:g} of {self.store.path}"

    # -- layout and balancing

    def _k(self, name: str) -> int:
        per_example = self.store.tasks[name].images_per_example * self.image_tokens
        k = self.config.seq_len // per_example
        if k == 0:
            raise DelvmError(
                f"data seq_len {self.config.seq_len} is shorter than one example of task {name} "
                f"({per_example} tokens); raise seq_len"
            )
        return k

    def _sentence_tokens(self) -> int:
        """Tokens per sentence: the same for every task, or the sampler refuses the store."""
        lengths = {
            t: k * self.store.tasks[t].images_per_example * self.image_tokens
            for t, k in self.examples_per_sentence.items()
        }
        if len(set(lengths.values())) > 1:
            raise DelvmError(
                f"data seq_len {self.config.seq_len} gives sentences of different lengths per "
                f"task {lengths}; choose a seq_len that is a multiple of every task's example"
            )
        return next(iter(lengths.values()))

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(training, validation) original example ids of a task; fixed by the seed."""
        n = self.store.tasks[name].num_examples
        held = math.ceil(self.config.val_fraction * n)
        if held >= n:
            raise DelvmError(
                f"task {name}: {n} examples, val_fraction {self.config.val_fraction} holds out "
                f"{held} and leaves none for training; lower data.val_fraction or add data"
            )
        order = np.random.default_rng([self.config.seed, SPLIT, _key(name)]).permutation(n)
        return np.sort(order[held:]), np.sort(order[:held])

    def _weight(self, name: str) -> float:
        if self.config.balance == "none":
            task = self.store.tasks[name]
            base = float(len(self.train[name].rows) * task.images_per_example)
        else:  # resample and augment: the same (equal) mix; they differ in what is drawn
            base = 1.0
        return base * float(self.config.task_weights.get(name, 1.0))

    def task_mix(self) -> dict[str, dict]:
        """Per task: its share of training sentences (= of tokens) and the distinct examples it
        draws from (originals, and stored rows counting augmented copies)."""
        total = sum(self.weights.values())
        return {
            t: {"share": self.weights[t] / total if total else 0.0,
                "originals": len(self.train[t].origins), "distinct": len(self.train[t].rows)}
            for t in self.tasks
        }  # fmt: skip

    # -- sentences

    def _compose(
        self,
        draws: list[tuple[str, np.random.Generator]],
        pools: dict[str, Pool],
        tokens: dict[str, TaskTokens],
    ) -> SentenceBatch:
        """One sentence per (task, rng) from ``pools``, whose rows index ``tokens``; the rows
        are gathered per task in one go."""
        length = self.sentence_tokens
        grouped: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        for b, (name, rng) in enumerate(draws):
            rows = pools[name].draw(rng, self.examples_per_sentence[name])
            positions, picks = grouped.setdefault(name, ([], []))
            positions.append(b)
            picks.append(rows)
        out = np.empty((len(draws), length), dtype=np.int64)
        for name, (positions, picks) in grouped.items():
            rows = tokens[name].tokens[np.concatenate(picks)]
            out[positions] = rows.reshape(len(positions), length)
        return SentenceBatch(torch.from_numpy(out), [name for name, _ in draws])

    def _noisy_inputs(self, ids: Tensor, draws: list[tuple[str, np.random.Generator]]) -> Tensor:
        """ids[:, :-1] with noisy answers, drawn from each sentence's rng after its examples."""
        inputs = ids[:, :-1].numpy().copy()
        for row, (name, rng) in zip(inputs, draws, strict=True):
            self._add_answer_noise(row, name, rng)
        return torch.from_numpy(inputs)

    def _add_answer_noise(self, row: np.ndarray, name: str, rng: np.random.Generator) -> None:
        """Replace a share U(0, answer_noise) of each later example's output codes in `row`."""
        noise = self.config.answer_noise
        per_example = self.store.tasks[name].images_per_example * self.image_tokens
        for end in range(2 * per_example, self.sentence_tokens + 1, per_example):
            answer = row[end - self.image_tokens : end]  # the sentence's last code is not in row
            hit = rng.random(len(answer)) < rng.uniform(0, noise)
            answer[hit] = rng.integers(0, self.vocab_size, int(hit.sum()))

    def train_batch(self, step: int, micro: int, rows: range, tasks: list[str]) -> SentenceBatch:
        """Rows `rows` of the global batch for (step, micro-batch), drawn from `tasks`."""
        weights = np.array([self.weights[t] for t in tasks], dtype=np.float64)
        if weights.sum() <= 0:
            raise DelvmError(f"tasks {tasks}: every weight is 0; fix data.task_weights")
        cumulative = np.cumsum(weights)
        draws = []
        for row in rows:
            rng = np.random.default_rng([self.config.seed, TRAIN, step, micro, row])
            u = rng.random() * cumulative[-1]
            draws.append((tasks[int(np.searchsorted(cumulative, u, side="right"))], rng))
        batch = self._compose(draws, self.train, self.store.tasks)
        if self.config.answer_noise > 0:
            batch = batch._replace(inputs=self._noisy_inputs(batch.ids, draws))
        return batch

    def val_batches(self, batch_size: int) -> list[SentenceBatch]:
        """The fixed validation sentences, `val_sentences` per task, in batches."""
        if batch_size not in self._val_cache:
            draws = [
                (name, np.random.default_rng([self.config.seed, VAL, _key(name), j]))
                for name in self.tasks
                if len(self.val[name].origins)
                for j in range(self.config.val_sentences)
            ]
            self._val_cache[batch_size] = [
                self._compose(draws[i : i + batch_size], self.val, self.val_tokens)
                for i in range(0, len(draws), batch_size)
            ]
        return self._val_cache[batch_size]

    def codebook(self) -> Tensor | None:
        """The tokenizer's codebook (for the codebook embedding), if one was given."""
        return self._codebook


@dataclass(frozen=True)
class Stage:
    """A continual-learning stage: `batches` batches drawn from `tasks` only."""

    tasks: list[str]
    batches: int


class SentenceStream:
    """An endless iterator of training batches with an exact integer position.

    Batch p of rank r is rows [r*batch_size, (r+1)*batch_size) of global batch p, so ranks see
    different sentences, and N ranks together see what one process with N x batch_size would.
    `stages` (continual learning) run in order and the stream ends after the last one.
    """

    def __init__(
        self,
        sampler: SentenceSampler,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        stages: list[Stage] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise DelvmError(f"rank {rank} is outside world size {world_size}")
        for stage in stages or []:
            unknown = sorted(set(stage.tasks) - set(sampler.tasks))
            if unknown or not stage.tasks:
                raise DelvmError(
                    f"stage tasks {stage.tasks}: use tasks of the store {sampler.tasks}"
                )
        self.sampler, self.batch_size = sampler, batch_size
        self.rows = range(rank * batch_size, (rank + 1) * batch_size)
        self.stages = stages
        self.position = 0

    def __iter__(self) -> SentenceStream:
        return self

    def __next__(self) -> SentenceBatch:
        tasks = self.sampler.tasks
        if self.stages is not None:
            tasks = self._stage_tasks()
        batch = self.sampler.train_batch(self.position, 0, self.rows, tasks)
        self.position += 1
        return batch

    def _stage_tasks(self) -> list[str]:
        end = 0
        for stage in self.stages:
            end += stage.batches
            if self.position < end:
                return stage.tasks
        raise StopIteration

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
