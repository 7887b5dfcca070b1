"""The trainer: DDP/FSDP2 equivalence, exact resume after SIGKILL, KD, signals, continual stages."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from delvm.errors import DelvmError
from delvm.model.checkpoint import load_model, save_model
from delvm.model.transformer import VisualLM, preset
from delvm.train import precision
from delvm.train.config import OptimSection, load_config
from delvm.train.distill import kd_loss
from delvm.train.optim import cosine_lr, stage_lr
from delvm.train.trainer import Trainer
from tests.support.sentences import PatternSentences

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-m", "tests.support.train_run"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def tiny_config(out, *overrides):
    base = [
        f"out={str(out)!r}", "steps=6", "micro_batch=2", "grad_accum=2", "checkpoint_every=2",
        "eval_every=3", "log_every=1", "tensorboard=false", "data.seq_len=65",
        "model.overrides={'vocab_size': 64, 'codebook_dim': 16}", "optim.lr=3e-3",
        "optim.min_lr=3e-4", "optim.warmup_ratio=0.2",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))


def losses(out: Path) -> list[float]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def final_weights(out: Path) -> dict:
    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    return load_file(latest / "model.safetensors")


def test_training_lowers_the_loss_and_writes_checkpoints(tmp_path):
    config = tiny_config(
        tmp_path / "run", "steps=30", "checkpoint_every=10", "eval_every=10", "tensorboard=true"
    )
    Trainer(config, PatternSentences()).run()
    curve = losses(tmp_path / "run")
    assert len(curve) == 30 and curve[-1] < curve[0] - 0.5
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000020", "step-000030"]  # keep_checkpoints = 2
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


def test_student_copy_of_teacher_has_zero_kd_loss(tmp_path):
    source = PatternSentences()
    teacher = VisualLM(preset("tiny", vocab_size=64, codebook_dim=16), codebook=source.codebook())
    save_model(teacher, tmp_path / "teacher")
    config = tiny_config(tmp_path / "run", "steps=1", f"distill.teacher={str(tmp_path / 'teacher')!r}",
                         f"init_from={str(tmp_path / 'teacher')!r}")  # fmt: skip
    trainer = Trainer(config, source)
    record = trainer.train_step(source.tasks)
    assert record["loss_kd"] == pytest.approx(0.0, abs=1e-6)
    assert record["loss_gt"] > 1.0


def test_teacher_must_share_the_tokenizer(tmp_path):
    save_model(VisualLM(preset("tiny", vocab_size=128, codebook_dim=16)), tmp_path / "teacher")
    config = tiny_config(tmp_path / "run", f"distill.teacher={str(tmp_path / 'teacher')!r}")
    with pytest.raises(DelvmError, match="share the tokenizer"):
        Trainer(config, PatternSentences())


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config(tmp_path / "run", "steps=20", "optim.lr=1e30", "optim.warmup_ratio=0.0",
                         "optim.grad_clip=1e30")  # fmt: skip
    with pytest.raises(DelvmError, match="non-finite"):
        Trainer(config, PatternSentences()).run()


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
    subprocess.run([*RUN, str(tmp_path / "killed"), *steps], check=True, env=ENV, cwd=ROOT,
                   capture_output=True)  # fmt: skip
    full, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert losses(tmp_path / "full")[-1] == losses(tmp_path / "killed")[-1]


def run_torchrun(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "tests.support.train_run", str(out), *overrides]  # fmt: skip
    return subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path, parallel):
    # One process: micro-batch 2. Two ranks: micro-batch 1 each -> the same 2 rows per micro-step.
    subprocess.run([*RUN, str(tmp_path / "one")], check=True, env=ENV, cwd=ROOT,
                   capture_output=True)  # fmt: skip
    result = run_torchrun(tmp_path / "two", "micro_batch=1", f"parallel={parallel!r}")
    if result.returncode != 0 and parallel == "fsdp" and "gloo" in result.stderr.lower():
        pytest.skip(f"FSDP2 on gloo is not supported by this torch: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    # Adam normalises tiny rounding differences of the two matmul splits into ~1e-6 steps.
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4) for k in w1)


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
    assert not precision.training_autocast("auto", cpu)._enabled  # auto: bf16 on GPUs only
    assert not precision.training_autocast("fp32", cpu)._enabled
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.training_autocast("bf16", cpu)._enabled
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: False)
    with pytest.warns(UserWarning, match="without AMX.*set precision = fp32"):
        assert precision.training_autocast("bf16", cpu)._enabled
