"""The trainer: DDP/FSDP2 equivalence, exact resume after SIGKILL, KD, signals, continual stages."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from delvm import devices
from delvm.errors import DelvmError
from delvm.model.checkpoint import load_model, save_model
from delvm.model.export import export_hf
from delvm.model.transformer import VisualLM, preset
from delvm.train import precision
from delvm.train.config import OptimSection
from delvm.train.distill import kd_loss
from delvm.train.optim import cosine_lr, stage_lr
from delvm.train.state import read_sharded_tensors, read_training_state
from delvm.train.trainer import Trainer
from tests.support.sentences import PatternSentences
from tests.support.train_run import tiny_config

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-m", "tests.support.train_run"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def losses(out: Path) -> list[float]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def final_weights(out: Path) -> dict:
    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    return checkpoint_tensors(latest)[0]


def test_training_lowers_the_loss_and_writes_checkpoints(tmp_path):
    config = tiny_config(
        tmp_path / "run", "steps=30", "checkpoint_every=10", "eval_every=10", "tensorboard=true"
    )
    Trainer(config, PatternSentences()).run()
    curve = losses(tmp_path / "run")
    assert len(curve) == 30 and curve[-1] < curve[0] - 0.5
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["latest", "step-000020", "step-000030"]  # keep_checkpoints = 2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000030\n"
    model = load_model(tmp_path / "run" / "checkpoints" / "step-000030")
    assert model.config.vocab_size == 64
    meta = json.loads((tmp_path / "run/checkpoints/step-000030/config.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == "test-fingerprint"
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val = [r["val"] for r in records if "val" in r][-1]
    assert set(val) == {"segmentation", "pose"}
    assert set(val["pose"]) == {"sentence", "target"}
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_lr_schedule_warmup_cosine_and_stage_policies():
    optim = OptimSection(lr=1.0, min_lr=0.1, warmup_ratio=0.1)
    assert cosine_lr(0, 100, optim) == pytest.approx(0.1)
    assert cosine_lr(9, 100, optim) == pytest.approx(1.0)
    assert cosine_lr(99, 100, optim) == pytest.approx(0.1, abs=1e-3)
    bounds = [(0, 50), (50, 50)]
    assert stage_lr(55, bounds, "continue", optim) == pytest.approx(cosine_lr(55, 100, optim))
    assert stage_lr(50, bounds, "rescale", optim) == pytest.approx(cosine_lr(0, 50, optim))
    assert stage_lr(54, bounds, "rescale", optim) == pytest.approx(1.0)


def test_kd_loss_equals_the_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100  # no label: excluded from both terms
    w_gt, w_kd, t = 0.7, 1.3, 2.0
    total, gt, kd = kd_loss(student, teacher, labels, w_gt, w_kd, t)
    valid = labels != -100
    s, te, y = student[valid], teacher[valid], labels[valid]
    direct_gt = -torch.log_softmax(s, -1).gather(1, y[:, None]).mean()
    p, q = torch.softmax(te / t, -1), torch.softmax(s / t, -1)
    direct_kd = t**2 * (p * (p.log() - q.log())).sum(-1).mean()
    assert gt.item() == pytest.approx(direct_gt.item(), rel=1e-5)
    assert kd.item() == pytest.approx(direct_kd.item(), rel=1e-5)
    assert total.item() == pytest.approx(
        w_gt * direct_gt.item() + w_kd * direct_kd.item(), rel=1e-5
    )
    assert kd_loss(student, student.clone(), labels)[2].item() == pytest.approx(0.0, abs=1e-6)


def test_the_trainer_distils_with_the_configured_weights_and_temperature(tmp_path):
    source = PatternSentences()
    models = {}
    for seed, name in enumerate(("student", "teacher")):
        torch.manual_seed(seed)
        models[name] = VisualLM(preset("tiny", vocab_size=64, codebook_dim=16),
                                codebook=source.codebook())  # fmt: skip
        with torch.no_grad():  # peaked logits, as trained ones: at the init T hardly matters
            models[name].head.weight.mul_(20.0)
        save_model(models[name], tmp_path / name)
    config = tiny_config(tmp_path / "run", f"distill.teacher={str(tmp_path / 'teacher')!r}",
                         f"init_from={str(tmp_path / 'student')!r}", "distill.w_gt=0.7",
                         "distill.w_kd=1.3", "distill.temperature=2.0")  # fmt: skip
    record = Trainer(config, source).train_step(source.tasks)
    # By hand on the step's two micro-batches (equal sizes: their mean is the mean over all rows).
    ids = torch.cat([source.train_batch(0, micro, range(2), source.tasks).ids for micro in (0, 1)])
    with torch.no_grad():
        student, teacher = (models[n](ids[:, :-1]).flatten(0, 1) for n in ("student", "teacher"))
    gt = F.cross_entropy(student, ids[:, 1:].flatten()).item()
    kl = F.kl_div(F.log_softmax(student / 2.0, -1), F.log_softmax(teacher / 2.0, -1),
                  reduction="batchmean", log_target=True).item()  # fmt: skip
    assert record["loss_gt"] == pytest.approx(gt, rel=1e-5)
    assert record["loss_kd"] == pytest.approx(2.0**2 * kl, rel=1e-5)
    assert record["loss"] == pytest.approx(0.7 * gt + 1.3 * 2.0**2 * kl, rel=1e-5)


@pytest.mark.parametrize("w_kd", [1.3, 0.0])
def test_a_draft_learns_the_teachers_own_greedy_answers(tmp_path, w_kd):
    """distill.answers = "teacher": the last image of each sentence is the teacher's greedy answer
    to the rest, and the loss is on that answer only (with w_kd = 0, on CE alone)."""
    source = PatternSentences()
    models = {}
    for seed, name in enumerate(("student", "teacher")):
        torch.manual_seed(seed)
        models[name] = VisualLM(preset("tiny", vocab_size=64, codebook_dim=16),
                                codebook=source.codebook()).eval()  # fmt: skip
        save_model(models[name], tmp_path / name)
    config = tiny_config(tmp_path / "run", f"distill.teacher={str(tmp_path / 'teacher')!r}",
                         f"init_from={str(tmp_path / 'student')!r}", "distill.answers='teacher'",
                         "distill.w_gt=0.7", f"distill.w_kd={w_kd}", "distill.temperature=2.0")  # fmt: skip
    record = Trainer(config, source).train_step(source.tasks)
    stored = torch.cat(
        [source.train_batch(0, micro, range(2), source.tasks).ids for micro in (0, 1)]
    )
    n = source.image_tokens
    ids = stored[:, :-n]
    with torch.no_grad():  # greedy by hand: a whole forward per code, no cache
        for _ in range(n):
            ids = torch.cat([ids, models["teacher"](ids)[:, -1].argmax(-1, keepdim=True)], 1)
        student, teacher = (models[m](ids[:, :-1])[:, -n:].flatten(0, 1) for m in models)
    assert (ids[:, -n:] != stored[:, -n:]).float().mean() > 0.5  # not the stored answers
    gt = F.cross_entropy(student, ids[:, -n:].flatten()).item()
    kl = F.kl_div(F.log_softmax(student / 2.0, -1), F.log_softmax(teacher / 2.0, -1),
                  reduction="batchmean", log_target=True).item()  # fmt: skip
    kd = 2.0**2 * kl if w_kd else 0.0
    assert record["loss_gt"] == pytest.approx(gt, rel=1e-5)
    assert record["loss_kd"] == pytest.approx(kd, rel=1e-5, abs=1e-9)
    assert record["loss"] == pytest.approx(0.7 * gt + w_kd * kd, rel=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["distill.answers='teacher'"], "needs distill.teacher"),
        (["distill.answers='teacher'", "distill.teacher='t'", "data.answer_noise=0.5"],
         "set data.answer_noise = 0"),
        (["distill.answers='student'"], "use 'data' or 'teacher'"),
    ],
)  # fmt: skip
def test_teacher_answers_need_a_teacher_and_clean_prompts(tmp_path, settings, message):
    with pytest.raises(DelvmError, match=message):
        tiny_config(tmp_path / "run", *settings)


def test_a_llama_teacher_distils_into_a_vit_student(tmp_path):
    # kd_1b_to_80m's pairing at toy size: the 80M student has the ViT-style block, the 1B llama's.
    source = PatternSentences()
    models = {}
    for seed, (name, shape) in enumerate((("student", "tiny-vit"), ("teacher", "tiny"))):
        torch.manual_seed(seed)
        models[name] = VisualLM(preset(shape, vocab_size=64, codebook_dim=16),
                                codebook=source.codebook())  # fmt: skip
        save_model(models[name], tmp_path / name)
    config = tiny_config(tmp_path / "run", "model.preset='tiny-vit'",
                         f"distill.teacher={str(tmp_path / 'teacher')!r}",
                         f"init_from={str(tmp_path / 'student')!r}")  # fmt: skip
    record = Trainer(config, source).train_step(source.tasks)
    ids = torch.cat([source.train_batch(0, micro, range(2), source.tasks).ids for micro in (0, 1)])
    with torch.no_grad():
        student, teacher = (models[n](ids[:, :-1]).flatten(0, 1) for n in ("student", "teacher"))
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1),
                  reduction="batchmean", log_target=True).item()  # fmt: skip
    assert kl > 0.01  # the two models do disagree
    assert record["loss_kd"] == pytest.approx(kl, rel=1e-5)


def test_teacher_must_share_the_tokenizer(tmp_path):
    save_model(VisualLM(preset("tiny", vocab_size=128, codebook_dim=16)), tmp_path / "teacher")
    config = tiny_config(tmp_path / "run", f"distill.teacher={str(tmp_path / 'teacher')!r}")
    with pytest.raises(DelvmError, match="share the tokenizer"):
        Trainer(config, PatternSentences())


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "keep_checkpoints=1"), PatternSentences())
    # The head's output turns to NaN from the fifth step on, after the step-4 checkpoint.
    trainer.bare.head.register_forward_hook(
        lambda module, inputs, out: out * float("nan") if trainer.step >= 4 else None
    )
    with pytest.raises(DelvmError, match="non-finite loss .* at step 4; stopped without updating"):
        trainer.run()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept == ["step-000004"]
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors")
    assert all(torch.isfinite(saved[k]).all() for k in saved)
    # Stopped without updating: the weights in memory are still the checkpoint's.
    state = trainer.bare.state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in saved)


def test_resume_with_a_different_model_is_an_error(tmp_path):
    Trainer(tiny_config(tmp_path / "run", "steps=2"), PatternSentences()).run()
    changed = tiny_config(tmp_path / "run", "steps=4",
                          "model.overrides={'vocab_size': 64, 'codebook_dim': 16, 'num_layers': 3}")  # fmt: skip
    with pytest.raises(DelvmError, match="different 'model' setting"):
        Trainer(changed, PatternSentences()).run()


def test_a_table_setting_given_as_text_is_named_before_training(tmp_path):
    # A TOML inline table on the command line is not parsed: it arrives as a string.
    with pytest.raises(DelvmError, match="model.overrides .* must be a table"):
        tiny_config(tmp_path / "run", "model.overrides={hidden_size=192}")
    with pytest.raises(DelvmError, match="data.task_weights .* must be a table"):
        tiny_config(tmp_path / "run", "data.task_weights=2")


def test_continual_stages_write_a_task_by_stage_matrix(tmp_path):
    config = tiny_config(tmp_path / "run", "steps=4", "lr_policy='rescale'",
                         "stages=[{'tasks': ['segmentation'], 'steps': 2}, {'tasks': ['pose'], 'steps': 2}]")  # fmt: skip
    Trainer(config, PatternSentences()).run()
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert [s["stage"] for s in stages] == [0, 1]
    assert all(set(s["val"]) == {"segmentation", "pose"} for s in stages)
    table = (tmp_path / "run" / "stages.md").read_text().splitlines()
    assert table[0] == "| after stage (trained on) | pose | segmentation |"
    assert table[3].startswith("| 2 (pose) | ")


def test_each_stages_own_lr_reaches_the_optimizer_at_that_stages_steps(tmp_path):
    # Table 10's shape at toy size: stages of unequal length, each peaking lower than the last.
    stages = [{"tasks": ["segmentation"], "steps": 3, "lr": 3e-3, "min_lr": 1e-3},
              {"tasks": ["pose"], "steps": 5, "lr": 1e-3, "min_lr": 2e-4}]  # fmt: skip
    config = tiny_config(tmp_path / "run", "steps=8", "lr_policy='rescale'", f"stages={stages!r}")
    trainer = Trainer(config, PatternSentences())
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([group["lr"] for group in trainer.optimizer.param_groups])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.run()
    # By hand: warmup_ratio 0.2 gives each stage one warmup step (round(0.6) and round(1.0)),
    # then cosine from the stage's lr to its min_lr over its remaining steps.
    c = math.cos(math.pi / 4)
    expected = [3e-3, 3e-3, 1e-3 + 1e-3,  # stage 1: progress 0, 1/2
                1e-3, 1e-3, 2e-4 + 4e-4 * (1 + c), 2e-4 + 4e-4, 2e-4 + 4e-4 * (1 - c)]  # fmt: skip
    assert len(seen) == 8
    for lrs, lr in zip(seen, expected, strict=True):
        assert lrs == pytest.approx([lr] * len(lrs), rel=1e-12)


def test_per_stage_lrs_are_checked_and_left_out_of_the_record_when_unset():
    def refused(*overrides: str) -> str:
        with pytest.raises(DelvmError) as err:
            tiny_config("run", "steps=4", *overrides)
        return str(err.value)

    stage = "{'tasks': ['pose'], 'steps': 4, 'lr': 1e-3}"
    assert refused(f"stages=[{stage}]") == (
        "config stages[0].lr is set but lr_policy = 'continue' runs one cosine at optim.lr; "
        'set lr_policy = "rescale" for per-stage lrs'
    )
    low = "stages=[{'tasks': ['pose'], 'steps': 4, 'lr': 1e-4}]"  # below tiny_config's min_lr
    assert refused("lr_policy='rescale'", low) == (
        "config stages[0]: min_lr 0.0003 must lie in 0..lr (0.0001)"
    )
    plain = tiny_config("run", "steps=4", "stages=[{'tasks': ['pose'], 'steps': 4}]")
    # As a checkpoint recorded it before stages had lrs: resuming compares these dicts.
    assert plain.to_dict()["stages"] == [{"tasks": ["pose"], "steps": 4}]
    own = tiny_config("run", "steps=4", "lr_policy='rescale'", f"stages=[{stage}]")
    assert own.to_dict()["stages"] == [{"tasks": ["pose"], "steps": 4, "lr": 1e-3}]
    assert (own.stage_optim(0).lr, own.stage_optim(0).min_lr) == (1e-3, own.optim.min_lr)


def logged_steps(out: Path) -> list[int]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """`tiny_config`'s 6 steps in one process, start to finish: what every split run must equal."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run([*RUN, str(out)], check=True, env=ENV, cwd=ROOT, capture_output=True)
    return out


@pytest.fixture
def one_thread():
    """This process computes on one thread, as the subprocesses (ENV) do: bitwise comparisons
    across them need the same float summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    steps = ["steps=40", "checkpoint_every=2", "keep_checkpoints=50"]
    subprocess.run([*RUN, str(tmp_path / "full"), *steps], check=True, env=ENV, cwd=ROOT,
                   capture_output=True)  # fmt: skip
    victim = subprocess.Popen([*RUN, str(tmp_path / "killed"), *steps], env=ENV, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = tmp_path / "killed" / "checkpoints" / "step-000006"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = sorted((tmp_path / "killed" / "checkpoints").glob("step-*"))
    assert done and done[-1].name < "step-000040", "the run must be killed part-way"
    before = logged_steps(tmp_path / "killed")
    subprocess.run([*RUN, str(tmp_path / "killed"), *steps], check=True, env=ENV, cwd=ROOT,
                   capture_output=True)  # fmt: skip
    # The rerun went on from the last checkpoint, not from step 0 ...
    resumed_at = int(done[-1].name.removeprefix("step-"))
    assert logged_steps(tmp_path / "killed")[len(before) :] == list(range(resumed_at + 1, 41))
    # ... and ended where the uninterrupted run did, bit for bit.
    full, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert losses(tmp_path / "full")[-1] == losses(tmp_path / "killed")[-1]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_at_the_step_and_a_rerun_resumes_exactly(
    tmp_path, uninterrupted, one_thread, monkeypatch, stop
):
    # A real signal to this process during step 3. Had the trainer no handler, this one would
    # record it (instead of Python's KeyboardInterrupt / termination ending the test session).
    unhandled = []
    previous = signal.signal(stop, lambda signum, frame: unhandled.append(signum))
    step = Trainer.train_step

    def signalled_in_step_three(self, tasks):
        record = step(self, tasks)
        if self.step == 2:
            os.kill(os.getpid(), stop)
        return record

    try:
        monkeypatch.setattr(Trainer, "train_step", signalled_in_step_three)
        config = tiny_config(tmp_path / "run", "checkpoint_every=100")  # no step checkpoints
        Trainer(config, PatternSentences()).run()
    finally:
        signal.signal(stop, previous)
    monkeypatch.undo()
    assert unhandled == []
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-000003"]
    Trainer(config, PatternSentences()).run()
    assert logged_steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]
    full, resumed = final_weights(uninterrupted), final_weights(tmp_path / "run")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


_TORN_WRITE = """
import os, signal, sys
import torch
from delvm.train.trainer import Trainer
from tests.support.sentences import PatternSentences
from tests.support.train_run import tiny_config

save = torch.save

def torn_save(state, path):  # the step-4 training state: half of it reaches the disk, then a kill
    save(state, path)
    if "step-000004" in str(path):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

torch.save = torn_save
Trainer(tiny_config(sys.argv[1]), PatternSentences()).run()
"""


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_to_resume(
    tmp_path, uninterrupted, one_thread
):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", _TORN_WRITE, str(out)], env=ENV, cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    written = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert written == ["step-000002", "step-000004.tmp"]  # the torn one never got its name
    Trainer(tiny_config(out), PatternSentences()).run()
    assert logged_steps(out) == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3 and 4 again, from step 2
    full, resumed = final_weights(uninterrupted), final_weights(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_fine_tuning_a_checkpoint_of_another_shape_is_an_error_showing_both(tmp_path):
    other = VisualLM(preset("tiny", vocab_size=64, codebook_dim=16, num_layers=3))
    save_model(other, tmp_path / "start")
    config = tiny_config(tmp_path / "run", f"init_from={str(tmp_path / 'start')!r}")
    with pytest.raises(DelvmError, match=r"start: its model config differs .*num_layers=3.* vs "
                       r".*num_layers=2.*set model.preset/overrides to match"):  # fmt: skip
        Trainer(config, PatternSentences())
    same = tiny_config(tmp_path / "run", f"init_from={str(tmp_path / 'start')!r}",
                       "model.overrides={'vocab_size': 64, 'codebook_dim': 16, 'num_layers': 3}")  # fmt: skip
    start = Trainer(same, PatternSentences()).bare.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in other.state_dict().items())


def run_torchrun(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "tests.support.train_run", str(out), *overrides]  # fmt: skip
    return subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel",
    # FSDP2 with activation checkpointing, as configs/paper_1b.toml trains.
    [["parallel='ddp'"], ["parallel='fsdp'", "activation_checkpointing=true"]],
    ids=["ddp", "fsdp"],
)
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(
    tmp_path, uninterrupted, parallel
):
    # One process: micro-batch 2. Two ranks: micro-batch 1 each -> the same 2 rows per micro-step.
    result = run_torchrun(tmp_path / "two", "micro_batch=1", *parallel)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(uninterrupted), losses(tmp_path / "two")
    assert len(one) == 6 and two == pytest.approx(one, rel=1e-5)
    w1, w2 = final_weights(uninterrupted), final_weights(tmp_path / "two")
    # Adam normalises tiny rounding differences of the two matmul splits into ~1e-6 steps.
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4) for k in w1)


def checkpoint_tensors(folder: Path) -> tuple[dict, dict]:
    """A training checkpoint's weights and optimizer state tensors (``fqn.exp_avg``...), whole,
    whichever format wrote them."""
    state = read_training_state(folder)
    if state["sharded"]:
        return read_sharded_tensors(folder, "model."), read_sharded_tensors(folder, "optim.")
    optim = state["optimizer"]["state"]
    return load_file(folder / "model.safetensors"), flat_optimizer_state(optim)


def flat_optimizer_state(state: dict) -> dict:
    return {f"{fqn}.{name}": value for fqn, per in state.items() for name, value in per.items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    (weights_a, optim_a), (weights_b, optim_b) = checkpoint_tensors(a), checkpoint_tensors(b)
    assert_same_tensors(weights_a, weights_b)
    assert_same_tensors(optim_a, optim_b)


@pytest.mark.slow
def test_sharded_fsdp_checkpoints_resume_on_one_rank_and_on_two(
    tmp_path, uninterrupted, one_thread
):
    fsdp = ["micro_batch=1", "parallel='fsdp'", "keep_checkpoints=3"]
    for form in ("full", "sharded"):
        result = run_torchrun(tmp_path / form, *fsdp, f"checkpoint_format={form!r}")
        assert result.returncode == 0, result.stderr[-3000:]
    full, sharded = (tmp_path / f / "checkpoints" for f in ("full", "sharded"))
    # Each rank wrote its own file of shards (half of every weight's rows), nothing gathered.
    files = sorted((sharded / "step-000004" / "shards").glob("*.safetensors"))
    assert len(files) == 2 and not (sharded / "step-000004" / "model.safetensors").exists()
    with safe_open(files[0], "pt") as f:
        assert f.get_slice("model.head.weight").get_shape() == [32, 64]  # of [64, 64]
    # Read whole, the shards are the gathered save, bit for bit: weights and optimizer state.
    for name in ("step-000004", "step-000006"):
        assert_same_checkpoint(full / name, sharded / name)

    # Resumed by 1 process reading the same rows per micro-step (tiny_config's micro_batch 2,
    # not the ranks' 1): the restored
    # weights and optimizer state are the full save's; the run ends where one process does.
    for run in ("one", "two"):
        shutil.copytree(tmp_path / "sharded", tmp_path / run)
        shutil.rmtree(tmp_path / run / "checkpoints" / "step-000006")
    with pytest.raises(DelvmError, match=r"written by 2 ranks x micro_batch 1 = 2 rows .*resumed "
                       r"by 1 x 1; set micro_batch = 2"):  # fmt: skip
        Trainer(tiny_config(tmp_path / "one", "micro_batch=1"), PatternSentences()).resume()
    trainer = Trainer(tiny_config(tmp_path / "one", "keep_checkpoints=3"), PatternSentences())
    trainer.resume()
    weights, optim = checkpoint_tensors(full / "step-000004")
    assert_same_tensors(trainer.bare.state_dict(), weights)
    restored = get_optimizer_state_dict(trainer.model, trainer.optimizer)["state"]
    assert_same_tensors(flat_optimizer_state(restored), optim)
    trainer.run()
    assert logged_steps(tmp_path / "one")[-2:] == [5, 6]
    w1, w2 = final_weights(uninterrupted), final_weights(tmp_path / "one")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4) for k in w1)

    # Resumed by 2 ranks: bit for bit the uninterrupted 2-rank run's step 6, sharded again.
    result = run_torchrun(tmp_path / "two", *fsdp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    last = tmp_path / "two" / "checkpoints" / "step-000006"
    assert_same_checkpoint(full / "step-000006", last)
    # Every reader of a checkpoint reads it whole: load_model, and export-hf through it.
    whole = load_model(full / "step-000006")
    assert_same_tensors(load_model(tmp_path / "two").state_dict(), whole.state_dict())
    exported = load_model(export_hf(tmp_path / "two", tmp_path / "hf"))
    ids = torch.randint(0, 64, (1, 16))
    assert torch.allclose(exported(ids), whole(ids), atol=1e-6)
    # A torn shard file is named, not a traceback.
    shard = sorted((last / "shards").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DelvmError, match=r"shards: unreadable checkpoint shards"):
        load_model(last)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    source = PatternSentences()
    batch = source.train_batch(0, 0, range(2), source.tasks).ids
    results = []
    for checkpointing in ("false", "true"):
        trainer = Trainer(tiny_config(tmp_path / checkpointing,
                                      f"activation_checkpointing={checkpointing}"), source)  # fmt: skip
        block_runs = []
        trainer.bare.blocks[0].attn.register_forward_hook(
            lambda *_, runs=block_runs: runs.append(1)
        )
        loss, _ = trainer._loss(batch, None)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.bare.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads, len(block_runs)))
    (plain_loss, plain_grads, plain_runs), (loss, grads, runs) = results
    assert (plain_runs, runs) == (1, 2)  # checkpointed: the block runs again in the backward
    assert loss == plain_loss
    assert all(torch.allclose(grads[n], plain_grads[n], rtol=1e-5, atol=1e-7) for n in grads)


def test_an_imported_hugging_face_folder_teaches(tmp_path):
    """A Llama folder written by transformers (as LVM's release) as the KD teacher."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128,
                            bos_token_id=None, eos_token_id=None)  # fmt: skip
    LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "teacher")
    config = tiny_config(
        tmp_path / "run", "steps=2", f"distill.teacher={str(tmp_path / 'teacher')!r}"
    )
    Trainer(config, PatternSentences()).run()
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    kd = [r["loss_kd"] for r in records if "loss_kd" in r]
    assert len(kd) == 2 and all(v > 0 for v in kd)


def test_bf16_autocast_where_asked_and_a_warning_on_a_cpu_that_emulates_it(monkeypatch):
    cpu = torch.device("cpu")
    assert not precision.training_autocast("fp32", cpu)._enabled
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.training_autocast("auto", cpu)._enabled  # native bf16: auto is bf16
        assert precision.training_autocast("bf16", cpu)._enabled
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not precision.training_autocast("auto", cpu)._enabled
    with pytest.warns(UserWarning, match="neither of amx_bf16, avx512_bf16.*set precision = fp32"):
        assert precision.training_autocast("bf16", cpu)._enabled
