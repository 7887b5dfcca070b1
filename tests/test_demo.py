"""`delvm demo`: the whole pipeline at toy size, stage reuse, and its config errors."""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from delvm.cli import main
from delvm.data.toyworld import ToyWorldConfig, toyworld_example
from delvm.demo.pipeline import STAGES, Demo, load_demo_config
from delvm.demo.report import task_rows
from delvm.errors import DelvmError
from delvm.tokenizer import load_tokenizer
from delvm.train.cli import open_sentences

CONFIG = "demo"
TINY = [
    "world.segmentation=40", "world.pose=8", "world.derain=8",
    "tokenizer.steps=6", "tokenizer.eval_every=3", "tokenizer.val_images=8",
    "train.steps=4", "train.eval_every=2", "train.micro_batch=2",
    "train.model.overrides={'hidden_size': 64, 'intermediate_size': 176, 'num_heads': 4, "
    "'num_layers': 2, 'max_seq_len': 256}",
    "scores.queries=3", "scores.recognition=3", "scores.grid_rows=1",
]  # fmt: skip


def stage_files(out) -> dict[str, tuple[int, bytes]]:
    """Every file the finished stages wrote, with its modification time and bytes."""
    files = [p for name in STAGES[:4] for p in sorted((out / name).rglob("*")) if p.is_file()]
    files.append(out / "scores.json")
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


@pytest.mark.slow
def test_demo_runs_end_to_end_resumes_a_killed_stage_then_reuses_every_stage(
    tmp_path, capsys, monkeypatch
):
    from delvm.train.trainer import Trainer

    out = tmp_path / "demo"
    # A real SIGTERM during the LVM's second step. Had the trainer no handler, this one would
    # record it (instead of Python's default ending the test session).
    unhandled = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: unhandled.append(signum))
    step = Trainer.train_step

    def signalled_in_step_two(self, tasks):
        record = step(self, tasks)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    try:
        monkeypatch.setattr(Trainer, "train_step", signalled_in_step_two)
        assert main(["demo", str(CONFIG), f"out={out}", *TINY]) == 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert unhandled == []
    assert "stage lvm stopped before it finished" in capsys.readouterr().err
    assert [p.name for p in (out / "lvm" / "checkpoints").glob("step-*")] == ["step-000002"]

    # The rerun reuses the three finished stages and resumes the LVM at its checkpoint ...
    assert main(["demo", str(CONFIG), f"out={out}", *TINY]) == 0
    first = capsys.readouterr().out
    assert all(f"[demo] {stage}: reused" in first for stage in STAGES[:3])
    assert "[demo] lvm: reused" not in first and "at step 2" in first
    # ... to the weights an uninterrupted run on the same store ends with.
    demo = Demo(load_demo_config(CONFIG, [f"out={out}", *TINY]))
    config = replace(demo.train_config(), out=str(tmp_path / "uninterrupted"))
    Trainer(config, open_sentences(config)).run()
    weights = {
        name: load_file(folder / "checkpoints" / "step-000004" / "model.safetensors")
        for name, folder in (("resumed", out / "lvm"), ("whole", tmp_path / "uninterrupted"))
    }
    assert all(torch.equal(weights["whole"][k], v) for k, v in weights["resumed"].items())

    page = (out / "report.html").read_text()
    scores = json.loads((out / "scores.json").read_text())
    # Every headline score sits in the page next to its baseline.
    for task, metric, model, _name, baseline, _beats, ceiling in task_rows(scores):
        assert f"<td>{task}</td><td>{metric}</td><td>{model:.3f}</td>" in page
        assert f"{baseline:.3f}" in page and f"{ceiling:.3f}</td></tr>" in page
    # Deraining's figures by hand: PSNR (data range 255) of the rainy inputs (the baseline) and
    # of the clean truths through the tokenizer (the ceiling) against the clean truths.
    config = demo.config
    world = ToyWorldConfig(**config.world)
    held_out = replace(world, seed=world.seed + config.scores.seed_offset, mixed=0.0)
    derain = [toyworld_example(held_out, "derain", i).images for i in range(config.scores.queries)]
    tokenizer = load_tokenizer(out / "tokenizer" / "tokenizer")
    clean = np.stack([clean for _, clean in derain])
    recon = tokenizer.decode(tokenizer.encode(clean)).permute(0, 2, 3, 1).numpy()
    recon = (recon * 255 + 0.5).astype(np.uint8)

    def psnr(images) -> float:
        mse = ((np.asarray(images, float) - clean) ** 2).mean((1, 2, 3))
        return float(np.mean(10 * np.log10(255**2 / mse)))

    # (float32 in torchmetrics: within 1e-6 dB here; the untrained tokenizer's reconstructions of
    # rainy and clean scenes differ by only a few thousandths of a dB, hence the tolerance.)
    baseline = psnr([rainy for rainy, _ in derain])
    assert scores["derain"]["baseline_input_psnr"] == pytest.approx(baseline, abs=1e-5)
    assert scores["ceiling"]["derain"]["psnr"] == pytest.approx(psnr(recon), abs=1e-5)
    assert scores["segmentation"]["baseline_black_miou"] == 0.0
    assert 0.0 <= scores["recognition"]["accuracy"] <= 1.0
    dependence = scores["prompt_dependence"]
    assert (
        set(dependence["nll"]) == set(dependence["per_task"]) == {"segmentation", "pose", "derain"}
    )
    nll = dependence["nll"]["pose"]["segmentation"]
    assert nll > 0 and f"{nll:.3f}" in page
    assert scores["shots"] == 1  # 256 tokens hold one example pair and the query pair
    assert page.count("data:image/png;base64,") == 5  # curves + 3 task grids + recognition grid
    # results.md: the same scores as Markdown, with each stage's measured time.
    timings = json.loads((out / "timings.json").read_text())
    assert list(timings) == list(STAGES[:-1])
    results = (out / "results.md").read_text()
    assert f"| derain | PSNR (dB) | {scores['derain']['psnr']:.3f} |" in results
    assert f"| lvm | {timings['lvm']['seconds']:.0f} |" in results

    # A third run reuses every finished stage: it rewrites none of their files.
    written = stage_files(out)
    assert main(["demo", str(CONFIG), f"out={out}", *TINY]) == 0
    second = capsys.readouterr().out
    assert all(f"[demo] {stage}: reused" in second for stage in STAGES[:-1])
    assert stage_files(out) == written
    # Reused stages keep the times they were measured in, so results.md does not change.
    assert json.loads((out / "timings.json").read_text()) == timings
    assert (out / "results.md").read_text() == results


@pytest.mark.parametrize("name", ["demo", "demo_full"])
def test_the_demo_configs_train_fast_on_any_cpu(name):
    """A CPU without bf16 matmul units (AMX, AVX512-BF16) emulates bf16 about ten times slower
    than fp32 (benchmarks/precision_cpu.py): the demos leave the choice to "auto"."""
    config = load_demo_config(name)
    assert config.tokenizer["precision"] == "auto"
    assert config.train["precision"] == "auto"


def test_a_demo_folder_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_config.json").write_text(json.dumps({"out": str(out), "world": {"seed": 5}}))
    assert main(["demo", str(CONFIG), f"out={out}"]) == 2
    assert re.search(r"other settings .*demo_config\.json", capsys.readouterr().err)


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(DelvmError, match=r"\[tokenizer\] \['out'\] are set by the demo"):
        load_demo_config(CONFIG, ["tokenizer.out=x"])
    with pytest.raises(DelvmError, match="unknown setting"):
        load_demo_config(CONFIG, ["colour=blue"])
    with pytest.raises(DelvmError, match=r"\[store\] unknown setting\(s\) \['shards'\]"):
        load_demo_config(CONFIG, ["store.shards=3"])
    with pytest.raises(DelvmError, match=r"\[world\] unknown"):
        load_demo_config(CONFIG, ["world.cats=3"])
    with pytest.raises(DelvmError, match="unknown setting"):
        load_demo_config(CONFIG, ["train.optim.speed=3"])
    with pytest.raises(DelvmError, match="no such config file"):
        load_demo_config(tmp_path / "missing.toml")
    with pytest.raises(DelvmError, match="scores.queries_per_prompt = 0"):
        load_demo_config(CONFIG, ["scores.queries_per_prompt=0"])
