"""Visual sentences: layout, balancing weights, held-out split, exact resume, ranks, stages."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from delvm.data.sampler import SamplerConfig, SentenceSampler, SentenceStream, Stage
from delvm.data.store import TaskArrays, open_store, write_store
from delvm.errors import DelvmError

TOKENS = 4  # tokens per image (a 2x2 grid)
IDENTITY = {"fingerprint": "0" * 16, "num_codes": 16384, "grid_size": 2, "path": ""}


def labelled_task(first_row: int, examples: int, copies: int, images: int = 2) -> TaskArrays:
    """Rows whose tokens say where they came from: token = row id * 8 + image, in every slot."""
    rows = [(o, 0) for o in range(examples)]
    rows += [(o, c) for o in range(examples) for c in range(1, copies + 1)]
    ids = first_row + np.arange(len(rows))
    tokens = ids[:, None, None] * 8 + np.arange(images)[None, :, None]
    tokens = np.broadcast_to(tokens, (len(rows), images, TOKENS)).copy()
    return TaskArrays(tokens, np.array(rows), [f"ex{o}" for o in range(examples)])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Long-tailed: seg 200 originals; pose 20 originals + 9 copies each (as `augment` builds)."""
    folder = tmp_path_factory.mktemp("store")
    tasks = {"seg": labelled_task(0, 200, 0), "pose": labelled_task(1000, 20, 9)}
    write_store(folder, tasks, IDENTITY, balance="augment")
    return open_store(folder)


def decode(ids: torch.Tensor, store) -> list[list[tuple[str, int, int]]]:
    """Each sentence as its (task, origin, copy) per example; checks the image order on the way."""
    out = []
    for sentence in ids.numpy():
        images = sentence.reshape(-1, TOKENS)
        assert (images == images[:, :1]).all()  # whole images, never cut
        codes = images[:, 0]
        examples = []
        for pair in codes.reshape(-1, 2):
            row, image = divmod(int(pair[0]), 8)
            assert image == 0 and pair[1] == pair[0] + 1  # input then output
            name, local = ("seg", row) if row < 1000 else ("pose", row - 1000)
            task = store.tasks[name]
            examples.append((name, int(task.origin[local]), int(task.copy[local])))
        out.append(examples)
    return out


def sampler(store, **settings):
    return SentenceSampler(store, SamplerConfig(**{"seq_len": 32, **settings}))


def test_a_sentence_is_k_whole_examples_of_one_task_in_order(store):
    s = sampler(store, val_fraction=0.1)
    assert s.examples_per_sentence == {"pose": 4, "seg": 4} and s.sentence_tokens == 32
    batch = s.train_batch(0, 0, range(64), s.tasks)
    assert batch.ids.dtype == torch.int64 and batch.ids.shape == (64, 32)
    for task, examples in zip(batch.tasks, decode(batch.ids, store), strict=True):
        assert {name for name, _, _ in examples} == {task}
        assert len({origin for _, origin, _ in examples}) == 4  # k different examples
    # A sentence depends on its address and the seed only.
    again = s.train_batch(0, 0, range(3, 5), s.tasks)
    assert torch.equal(again.ids, batch.ids[3:5]) and again.tasks == batch.tasks[3:5]
    assert not torch.equal(sampler(store, seed=1).train_batch(0, 0, range(64), s.tasks).ids,
                           batch.ids)  # fmt: skip


def task_shares(s, tasks, n=3000) -> dict[str, float]:
    names = s.train_batch(7, 0, range(n), tasks).tasks
    return {t: names.count(t) / n for t in tasks}


@pytest.mark.parametrize(
    "balance, weights, pose_share",
    [
        # Training examples after holding out 5 %: pose 19 (+ 9 copies each), seg 190.
        ("none", {}, 19 / (19 + 190)),  # originals only, natural proportions
        ("resample", {}, 0.5),
        ("augment", {}, 0.5),  # the same mix as resample: copies add diversity, not weight
        ("augment", {"pose": 3.0}, 0.75),
        ("resample", {"pose": 3.0}, 0.75),
    ],
)
def test_task_shares_follow_the_balancing_mode(store, balance, weights, pose_share):
    shares = task_shares(sampler(store, balance=balance, task_weights=weights), ["pose", "seg"])
    sigma = (pose_share * (1 - pose_share) / 3000) ** 0.5
    assert abs(shares["pose"] - pose_share) < 4 * sigma + 1e-9


def test_resample_and_augment_draw_the_same_mix_and_examples_differing_only_in_copies(store):
    """The balance study's arms: one task mix, one draw of originals; augment swaps in copies."""
    for weights in ({}, {"seg": 2.5}):
        draws = {
            mode: sampler(store, balance=mode, task_weights=weights).train_batch(
                3, 0, range(400), ["pose", "seg"]
            )
            for mode in ("resample", "augment")
        }
        assert draws["resample"].tasks == draws["augment"].tasks  # sentence by sentence
        examples = {m: decode(b.ids, store) for m, b in draws.items()}
        origins = {m: [[(t, o) for t, o, _ in s] for s in e] for m, e in examples.items()}
        assert origins["resample"] == origins["augment"]
        copies = [c for s in examples["augment"] for t, _, c in s if t == "pose"]
        assert max(copies) > 0 and all(c == 0 for s in examples["resample"] for *_, c in s)
    mix = {m: sampler(store, balance=m).task_mix() for m in ("resample", "augment")}
    assert mix["resample"]["pose"]["share"] == mix["augment"]["pose"]["share"] == 0.5
    assert mix["augment"]["pose"]["originals"] == mix["resample"]["pose"]["originals"] == 19
    assert (
        mix["augment"]["pose"]["distinct"] == 19 * 10 and mix["resample"]["pose"]["distinct"] == 19
    )


def test_copies_are_used_only_under_augment(store):
    for balance, expect_copies in (("none", False), ("resample", False), ("augment", True)):
        batch = sampler(store, balance=balance).train_batch(0, 0, range(200), ["pose"])
        copies = {c for sentence in decode(batch.ids, store) for _, _, c in sentence}
        assert (copies != {0}) == expect_copies


def test_held_out_examples_and_their_copies_never_reach_training(store):
    s = sampler(store, val_fraction=0.25, val_sentences=5)
    for name in ("pose", "seg"):
        train, val = s.split(name)
        assert len(val) == int(np.ceil(0.25 * store.tasks[name].num_examples))
        assert not set(train) & set(val) and len(train) + len(val) == store.tasks[name].num_examples
    seen = {"pose": set(), "seg": set()}
    for step in range(10):
        batch = s.train_batch(step, 0, range(64), s.tasks)
        for sentence in decode(batch.ids, store):
            for name, origin, _ in sentence:
                seen[name].add(origin)
    assert all(not seen[name] & set(s.split(name)[1]) for name in seen)
    assert len(seen["pose"]) == 15  # every training example of pose shows up

    val = s.val_batches(batch_size=4)
    assert [len(b.tasks) for b in val] == [4, 4, 2]  # 5 sentences x 2 tasks
    for batch in val:
        for name, sentence in zip(batch.tasks, decode(batch.ids, store), strict=True):
            assert all(o in s.split(name)[1] and c == 0 for _, o, c in sentence)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(val, s.val_batches(4), strict=True))


def test_answer_noise_replaces_only_what_the_model_reads_of_later_answers(store):
    clean = sampler(store).train_batch(3, 0, range(400), ["pose", "seg"])
    noisy_sampler = sampler(store, answer_noise=1.0)
    noisy = noisy_sampler.train_batch(3, 0, range(400), ["pose", "seg"])
    assert clean.inputs is None
    # The same sentences and labels; only the inputs differ, and only in the output images of
    # examples 2..4 (the sentence's last code is never an input).
    assert torch.equal(noisy.ids, clean.ids) and noisy.tasks == clean.tasks
    changed = noisy.inputs != clean.ids[:, :-1]
    answers = torch.zeros(31, dtype=torch.bool)
    answers[12:16] = answers[20:24] = answers[28:31] = True
    assert not changed[:, ~answers].any()
    # Rates drawn per example from U(0, 1): half the codes on average, some answers untouched
    # and some replaced whole.
    assert 0.45 < changed[:, answers].float().mean() < 0.55
    per_answer = changed[:, 12:16].float().mean(1)
    assert (per_answer == 0).any() and (per_answer == 1).any()
    assert (noisy.inputs[changed] < store.num_codes).all()
    again = noisy_sampler.train_batch(3, 0, range(400), ["pose", "seg"])
    assert torch.equal(again.inputs, noisy.inputs)  # a function of the address, as the ids
    assert all(batch.inputs is None for batch in noisy_sampler.val_batches(8))


def test_a_resumed_stream_continues_exactly_and_ranks_split_the_global_batch(store):
    s = sampler(store)
    full = SentenceStream(s, batch_size=4)
    batches = [next(full) for _ in range(6)]

    resumed = SentenceStream(s, batch_size=4)
    for _ in range(3):
        next(resumed)
    state = resumed.state_dict()
    fresh = SentenceStream(s, batch_size=4)
    fresh.load_state_dict(state)
    for expected in batches[3:]:
        assert torch.equal(next(fresh).ids, expected.ids)

    ranks = [SentenceStream(s, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    for expected in batches[:3]:
        parts = [next(rank) for rank in ranks]
        assert not torch.equal(parts[0].ids, parts[1].ids)
        assert torch.equal(torch.cat([p.ids for p in parts]), expected.ids)


def test_continual_stages_run_in_order_then_stop(store):
    stages = [Stage(["seg"], 2), Stage(["pose"], 3)]
    stream = SentenceStream(sampler(store), batch_size=8, stages=stages)
    tasks = [set(batch.tasks) for batch in stream]
    assert tasks == [{"seg"}] * 2 + [{"pose"}] * 3
    with pytest.raises(DelvmError, match="stage tasks"):
        SentenceStream(sampler(store), batch_size=8, stages=[Stage(["depth"], 1)])


def test_bad_settings_are_clear_errors(store, tmp_path):
    with pytest.raises(DelvmError, match="shorter than one example of task pose"):
        sampler(store, seq_len=4)
    with pytest.raises(DelvmError, match=r"task_weights: \['depth'\] not in the store"):
        sampler(store, task_weights={"depth": 2.0})
    with pytest.raises(DelvmError, match="every weight is 0"):
        sampler(store, task_weights={"pose": 0.0, "seg": 0}).train_batch(0, 0, range(1), ["pose"])
    with pytest.raises(DelvmError, match="leaves none for training"):
        SentenceSampler(store, SamplerConfig(seq_len=32, val_fraction=0.99))
    with pytest.raises(DelvmError, match=r"answer_noise = 1.5: use a share in \[0, 1\]"):
        SamplerConfig(answer_noise=1.5)
    from delvm.train.config import load_config

    with pytest.raises(DelvmError, match="answer_noise = -0.1"):  # refused with the config
        load_config(None, ["data.answer_noise=-0.1"])

    mixed = {"pairs": labelled_task(0, 4, 0), "clips": labelled_task(100, 4, 0, images=3)}
    write_store(tmp_path / "mixed", mixed, IDENTITY, balance="none")
    mixed_store = open_store(tmp_path / "mixed")
    with pytest.raises(DelvmError, match="built with balance = 'none'"):
        SentenceSampler(mixed_store, SamplerConfig(seq_len=24))
    with pytest.raises(DelvmError, match="sentences of different lengths"):
        SentenceSampler(mixed_store, SamplerConfig(seq_len=16, balance="none", val_fraction=0))
    ok = SentenceSampler(mixed_store, SamplerConfig(seq_len=24, balance="none", val_fraction=0))
    assert ok.examples_per_sentence == {"clips": 2, "pairs": 3}


def test_the_trainer_trains_on_a_store(store, tmp_path):
    from delvm.model.checkpoint import load_model
    from delvm.train.config import load_config
    from delvm.train.trainer import Trainer

    config = load_config(None, [
        f"out={str(tmp_path / 'run')!r}", "steps=2", "micro_batch=2", "eval_every=2",
        "checkpoint_every=2", "log_every=1", "tensorboard=false", "data.seq_len=32",
        "precision='fp32'",
        "model.overrides={'embedding': 'learned', 'vocab_size': 16384, 'hidden_size': 16, "
        "'intermediate_size': 32, 'num_heads': 2, 'num_layers': 1, 'max_seq_len': 32}",
    ])  # fmt: skip
    data = config.data
    s = SentenceSampler(store, SamplerConfig(seq_len=data.seq_len, val_sentences=2))
    trainer = Trainer(config, s)
    first = s.train_batch(0, 0, range(2), s.tasks).ids
    with torch.no_grad():
        first_loss = F.cross_entropy(
            trainer.bare(first[:, :-1]).flatten(0, 1), first[:, 1:].flatten()
        )
    trainer.run()
    records = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    # Step 1 trained on the store's first sentences ...
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert records[0]["loss"] == pytest.approx(first_loss.item(), rel=1e-5)
    # ... and validation scored its held-out sentences (by hand here, with the step-2 weights).
    model = load_model(tmp_path / "run" / "checkpoints" / "step-000002")
    nll = {task: [] for task in s.tasks}
    with torch.no_grad():
        for ids, tasks, _ in s.val_batches(2):
            logits = model(ids[:, :-1])
            for row, task in enumerate(tasks):
                nll[task].append(F.cross_entropy(logits[row], ids[row, 1:], reduction="none"))
    val = [r["val"] for r in records if "val" in r][-1]
    for task in s.tasks:
        expected = torch.cat(nll[task]).mean().item()
        assert val[task]["sentence"]["loss"] == pytest.approx(expected, rel=1e-5)


def test_the_trainer_reads_the_noisy_answers(store, tmp_path):
    from delvm.train.config import load_config
    from delvm.train.trainer import Trainer

    config = load_config(None, [
        f"out={str(tmp_path / 'run')!r}", "micro_batch=2", "data.seq_len=32", "precision='fp32'",
        "model.overrides={'embedding': 'learned', 'vocab_size': 16384, 'hidden_size': 16, "
        "'intermediate_size': 32, 'num_heads': 2, 'num_layers': 1, 'max_seq_len': 32}",
    ])  # fmt: skip
    s = SentenceSampler(store, SamplerConfig(seq_len=32, answer_noise=1.0))
    trainer = Trainer(config, s)
    batch = s.train_batch(0, 0, range(2), s.tasks)
    assert not torch.equal(batch.inputs, batch.ids[:, :-1])
    # The model reads the noisy answers; the loss scores its predictions against the true codes:
    # the same sentence drawn without answer noise.
    truth = sampler(store).train_batch(0, 0, range(2), s.tasks).ids
    with torch.no_grad():
        logits = trainer.bare(batch.inputs)
    expected = F.cross_entropy(logits.flatten(0, 1), truth[:, 1:].flatten()).item()
    seen, forward = [], trainer.forward
    trainer.forward = lambda inputs: seen.append(inputs.clone()) or forward(inputs)
    record = trainer.train_step(s.tasks)
    assert torch.equal(seen[0], batch.inputs)
    assert record["loss"] == pytest.approx(expected, rel=1e-5)
