"""`delvm demo`: the whole pipeline at toy size, stage reuse, and its config errors."""

from __future__ import annotations

import json
import re

import pytest

from delvm.cli import main
from delvm.demo.pipeline import STAGES, load_demo_config
from delvm.demo.report import task_rows
from delvm.errors import DelvmError

CONFIG = "demo"
TINY = [
    "world.segmentation=40", "world.pose=8", "world.derain=8",
    "tokenizer.steps=6", "tokenizer.eval_every=3", "tokenizer.val_images=8",
    "train.steps=4", "train.eval_every=2", "train.micro_batch=2",
    "train.model.overrides={'hidden_size': 64, 'intermediate_size': 176, 'num_heads': 4, "
    "'num_layers': 2, 'max_seq_len': 256}",
    "scores.queries=3", "scores.recognition=3", "scores.grid_rows=1",
]  # fmt: skip


@pytest.mark.slow
def test_demo_runs_end_to_end_then_reuses_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", str(CONFIG), f"out={out}", *TINY]) == 0
    first = capsys.readouterr().out
    page = (out / "report.html").read_text()
    scores = json.loads((out / "scores.json").read_text())
    # Every headline score sits in the page next to its baseline.
    for task, metric, model, _name, baseline, _beats, ceiling in task_rows(scores):
        assert f"<td>{task}</td><td>{metric}</td><td>{model:.3f}</td>" in page
        assert f"{baseline:.3f}" in page and f"{ceiling:.3f}</td></tr>" in page
        assert ceiling == scores["ceiling"][task][{"mIoU": "miou", "PCK@0.2": "pck@0.2",
                                                   "COCO AP": "coco_ap", "PSNR (dB)": "psnr",
                                                   "SSIM": "ssim"}[metric]]  # fmt: skip
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
    for stage in STAGES[:-1]:
        assert f"[demo] {stage}: reused" not in first
    # results.md: the same scores as Markdown, with each stage's measured time.
    timings = json.loads((out / "timings.json").read_text())
    assert list(timings) == list(STAGES[:-1])
    results = (out / "results.md").read_text()
    assert f"| derain | PSNR (dB) | {scores['derain']['psnr']:.3f} |" in results
    assert f"| lvm | {timings['lvm']['seconds']:.0f} |" in results

    # A rerun reuses every finished stage and writes the same scores.
    assert main(["demo", str(CONFIG), f"out={out}", *TINY]) == 0
    second = capsys.readouterr().out
    assert all(f"[demo] {stage}: reused" in second for stage in STAGES[:-1])
    assert json.loads((out / "scores.json").read_text()) == scores
    # Reused stages keep the times they were measured in, so results.md does not change.
    assert json.loads((out / "timings.json").read_text()) == timings
    assert (out / "results.md").read_text() == results


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


def test_a_stage_stopped_by_a_signal_stops_the_demo(tmp_path, monkeypatch, capsys):
    from delvm.tokenizer.train import TokenizerTrainer

    # A trainer stopped by SIGTERM saves a checkpoint and returns without finishing.
    monkeypatch.setattr(TokenizerTrainer, "run", lambda self: {})
    assert main(["demo", str(CONFIG), f"out={tmp_path / 'demo'}", *TINY]) == 2
    assert "stage tokenizer stopped before it finished" in capsys.readouterr().err
    assert (tmp_path / "demo" / "world" / "toyworld.json").exists()  # what was built stays
