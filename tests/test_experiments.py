"""The paper's studies end to end at their smallest scale: a random 32 px tokenizer, a handful of
toy-world examples, 2-3 steps per arm. They check the studies run and report, not what they find."""

import json
from pathlib import Path

import pytest

from delvm.cli import main
from delvm.data.store import open_store
from tests.support.tiny import untrained_cpu_tokenizer

TASKS = {"segmentation", "pose", "derain"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    model = untrained_cpu_tokenizer(resolution=32, num_embeddings=128)
    return model.save_pretrained(tmp_path_factory.mktemp("tok") / "tok")  # 4 x 4 tokens


def run(study: str, tokenizer: Path, out: Path, *extra: str) -> dict:
    argv = ["experiment", study, "--tokenizer", str(tokenizer), "--out", str(out),
            "--steps", "2", "--resolution", "32", "--segmentation", "8", "--pose", "4",
            "--derain", "4", "--eval-examples", "4", "--set", "data.seq_len=64",
            "--set", "data.val_sentences=2", "--set", "micro_batch=2", *extra]  # fmt: skip
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert (out / "loss_curves.png").stat().st_size > 0
    for arm, result in results.items():
        assert set(result) == TASKS
        assert f"| {arm} | pose |" in report
        assert (out / "samples" / f"{arm}.png").is_file()
        log = (out / "arms" / arm / "log.jsonl").read_text().splitlines()
        assert max(json.loads(line)["step"] for line in log) == 2 or study == "continual"
    return results


@pytest.mark.slow
def test_balance(tokenizer: Path, tmp_path: Path):
    results = run("balance", tokenizer, tmp_path)
    assert list(results) == ["unbalanced", "resampled", "augmented"]
    store = open_store(tmp_path / "stores" / "augment")
    assert store.balance == "augment" and store.tasks["pose"].copy.max() > 0
    # Same steps and seed, different data mixing: the arms must not be the same run.
    losses = {a: r["pose"]["sentence"]["loss"] for a, r in results.items()}
    assert len(set(losses.values())) > 1


@pytest.mark.slow
def test_data_scaling(tokenizer: Path, tmp_path: Path):
    results = run("data-scaling", tokenizer, tmp_path, "--real-factors", "1", "2", "--copies", "2")
    assert list(results) == ["real-x1", "real-x2", "augmented-c2"]
    stores = {n: open_store(tmp_path / "stores" / n) for n in ("real-x1", "real-x2", "aug-c2")}
    assert stores["real-x2"].tasks["pose"].num_examples == 2 * 4
    assert stores["aug-c2"].tasks["pose"].copy.max() == 2
    assert stores["aug-c2"].tasks["derain"].copy.max() == 0


@pytest.mark.slow
def test_kd(tokenizer: Path, tmp_path: Path):
    results = run("kd", tokenizer, tmp_path, "--teacher", "num_layers=3")
    assert list(results) == ["teacher", "student", "student-kd"]
    arms = tmp_path / "arms"
    kd_log = [
        json.loads(line) for line in (arms / "student-kd" / "log.jsonl").read_text().splitlines()
    ]
    assert all("loss_kd" in r for r in kd_log if "loss" in r)  # trained against the teacher
    layers = {
        a: json.loads((arms / a / "checkpoints" / "step-000002" / "config.json").read_text())
        ["model"]["num_layers"] for a in ("teacher", "student")
    }  # fmt: skip
    assert layers == {"teacher": 3, "student": 2}


@pytest.mark.slow
def test_continual(tokenizer: Path, tmp_path: Path):
    results = run("continual", tokenizer, tmp_path, "--steps", "3")
    assert list(results) == ["lr-continue", "lr-rescale"]
    report = (tmp_path / "report.md").read_text()
    assert report.count("after each stage") == 2
    stages = json.loads((tmp_path / "arms" / "lr-rescale" / "stages.json").read_text())
    assert [s["step"] for s in stages] == [1, 2, 3]


def test_bad_store_is_one_line_error(tokenizer: Path, tmp_path: Path, capsys):
    argv = ["experiment", "balance", "--tokenizer", str(tokenizer), "--out", str(tmp_path),
            "--store", str(tmp_path / "missing")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("delvm: error:") and "missing" in err and err.count("\n") == 1


def test_rerun_with_other_settings_is_refused(tokenizer: Path, tmp_path: Path, capsys):
    argv = ["experiment", "continual", "--tokenizer", str(tokenizer), "--out", str(tmp_path)]
    (tmp_path / "study.json").write_text('{"steps": "7"}')
    assert main(argv) == 2
    assert "other settings" in capsys.readouterr().err
    assert main([*argv, "--stages", "pose"]) == 2
    assert "two stages" in capsys.readouterr().err
