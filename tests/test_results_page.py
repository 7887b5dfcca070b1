"""The results page is generated: the demo's results.md from its JSON, `delvm results` from runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from delvm.cli import main
from delvm.demo.report import write_results
from delvm.results import hardware_class

TASKS = ("segmentation", "pose", "derain")


def _validation(loss: float) -> dict:
    return {
        "sentence": {"loss": loss, "accuracy": 12.5, "perplexity": 2.718281828**loss},
        "target": {"loss": loss + 1, "accuracy": 10.0, "perplexity": 2.718281828 ** (loss + 1)},
    }


def synthetic_demo(out: Path) -> dict:
    """A finished demo folder's JSON, with numbers no real run would give."""
    scores = {
        "shots": 1,
        "segmentation": {
            "miou": 0.4561,
            "baseline_black_miou": 0.0,
            "baseline_foreground_miou": 0.5,
        },  # fmt: skip
        "pose": {
            "pck@0.2": 0.0711,
            "baseline_black_pck@0.2": 0.0,
            "coco_ap": 0.0123,
            "baseline_black_coco_ap": 0.0,
        },  # fmt: skip
        "derain": {
            "psnr": 19.19,
            "baseline_input_psnr": 16.63,
            "ssim": 0.634,
            "baseline_input_ssim": 0.468,
        },  # fmt: skip
        "ceiling": {
            "segmentation": {"miou": 0.923},
            "pose": {"pck@0.2": 0.213, "coco_ap": 0.3},
            "derain": {"psnr": 21.19, "ssim": 0.674},
        },  # fmt: skip
        "recognition": {
            "accuracy": 0.9306,
            "per_task": {"segmentation": 0.7917, "pose": 1.0, "derain": 1.0},
        },  # fmt: skip
        "prompt_dependence": {
            "accuracy": 0.5,
            "per_task": {"segmentation": 0.25, "pose": 0.25, "derain": 1.0},
            "nll": {p: {t: 4.0 + TASKS.index(p) - 0.5 * (p == t) for t in TASKS} for p in TASKS},
        },
        "validation": {task: _validation(3.0 + i) for i, task in enumerate(TASKS)},
    }
    (out / "tokenizer").mkdir(parents=True)
    (out / "scores.json").write_text(json.dumps(scores))
    (out / "tokenizer" / "report.json").write_text(json.dumps({"steps": 1000,
                                                               "final": {"psnr": 19.3}}))  # fmt: skip
    settings = {"out": str(out), "world": {"seed": 0, "segmentation": 1200, "pose": 300,
                                           "derain": 300},
                "train": {"steps": 2800, "model": {"preset": "tiny"}}}  # fmt: skip
    (out / "demo_config.json").write_text(json.dumps(settings))
    return scores


def stage(seconds: float, hardware: str = "CPU X, 2 CPU(s) usable") -> dict:
    return {"seconds": seconds, "finished": "2026-12-02T10:00:00+00:00", "hardware": hardware}


def test_demo_results_md_holds_every_score_of_its_json(tmp_path):
    out = tmp_path / "demo_out"
    scores = synthetic_demo(out)
    stages = {"world": stage(11.4), "tokenizer": stage(111.2), "scores": stage(32.0)}
    text = write_results(out, "delvm demo demo", stages).read_text()

    assert text.startswith("# The demo: `delvm demo demo`\n")
    assert "scores finished 2026-12-02T10:00:00+00:00" in text
    assert "- Hardware: CPU X, 2 CPU(s) usable.\n" in text
    # Headline rows: value, baseline, whether it beats it, the ceiling (foreground: 0.456 < 0.5).
    assert "| segmentation | mIoU | 0.456 | all black | 0.000 | yes | 0.923 |" in text
    assert "| segmentation | mIoU | 0.456 | all foreground | 0.500 | no | 0.923 |" in text
    assert "| pose | PCK@0.2 | 0.071 | all black | 0.000 | yes | 0.213 |" in text
    assert "| derain | PSNR (dB) | 19.190 | rainy input | 16.630 | yes | 21.190 |" in text
    assert "| segmentation | 79.2 % |" in text and "| all | 93.1 % |" in text
    # The prompt-dependence matrix, row by row, and its share.
    assert "| pose | 5.000 | 4.500 | 5.000 |" in text
    assert "| most likely under its own prompt | 25.0 % | 25.0 % | 100.0 % |" in text
    assert "50.0 % of truths" in text
    # Validation in evaluate's table; times and their sum (no hardware column: one machine).
    assert "| derain | 5.0000 | 12.50 |" in text
    assert "| tokenizer | 111 | 2026-12-02T10:00:00+00:00 |" in text
    assert "All stages listed: 155 s." in text
    assert "world segmentation 1200 : pose\n  300 : derain 300" in text
    assert f"{scores['shots']} example pair(s)" in text


def test_demo_results_md_names_each_stages_machine_when_they_differ(tmp_path):
    out = tmp_path / "demo_out"
    synthetic_demo(out)
    stages = {"world": stage(10, "machine A"), "scores": stage(20, "machine B")}
    text = write_results(out, "delvm demo demo", stages).read_text()
    assert "Hardware: each stage's, in the time table below." in text
    assert "| world | 10 | 2026-12-02T10:00:00+00:00 | machine A |" in text
    assert "| scores | 20 | 2026-12-02T10:00:00+00:00 | machine B |" in text


def test_results_page_assembles_runs_in_order_and_carries_their_images(tmp_path, capsys):
    demo, studies = tmp_path / "demo_out", tmp_path / "reproduce_out"
    synthetic_demo(demo)
    write_results(demo, "delvm demo demo", {"scores": stage(30)})
    (studies / "balance").mkdir(parents=True)
    (studies / "balance" / "loss_curves.png").write_bytes(b"png bytes")
    (studies / "results.md").write_text(
        "# The paper's studies\n\n## Balance\n\n![loss](balance/loss_curves.png)\n"
        "[paper](https://arxiv.org/abs/2402.04841)\n\n```text\n# not a heading\n```\n"
    )
    page = tmp_path / "docs" / "results.md"

    assert main(["results", str(page), str(demo), str(studies)]) == 0
    text = page.read_text()
    assert text.startswith("# Measured results\n")
    assert f"`delvm results {page} {demo} {studies}`" in text
    # Each run is a section, in the order given; a code block's '#' line is left alone.
    assert text.index("## The demo: `delvm demo demo`") < text.index("## The paper's studies")
    assert "### Task scores against trivial baselines" in text and "### Balance" in text
    assert "\n# not a heading\n" in text
    # The image is copied beside the page and the link points at the copy; URLs are kept.
    assert "![loss](results_files/reproduce_out/balance/loss_curves.png)" in text
    copied = page.parent / "results_files" / "reproduce_out" / "balance" / "loss_curves.png"
    assert copied.read_bytes() == b"png bytes"
    assert "[paper](https://arxiv.org/abs/2402.04841)" in text
    # The demo's section is its results.md, headings one level down.
    demo_text = (demo / "results.md").read_text()
    assert re.sub(r"^#", "##", demo_text, flags=re.M).strip() in text

    # Regenerating without the studies drops their section and their copied files.
    assert main(["results", str(page), str(demo)]) == 0
    assert "The paper's studies" not in page.read_text()
    assert not (page.parent / "results_files").exists()


def test_results_page_refuses_a_folder_without_results(tmp_path, capsys):
    page = tmp_path / "results.md"
    assert main(["results", str(page), str(tmp_path / "demo_out")]) == 2
    assert re.search(r"no results\.md in .*demo_out: pass folders of finished runs",
                     capsys.readouterr().err)  # fmt: skip
    assert not page.exists()


@pytest.mark.parametrize("part", ["CPU(s) usable", f"torch {torch.__version__}"])
def test_hardware_class_names_the_machine(part):
    assert part in hardware_class()
