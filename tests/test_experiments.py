"""The paper's studies end to end at their smallest scale (a random 32 px tokenizer, a handful of
toy-world examples, 2-3 steps per arm): they check the studies run, pair their arms over seeds and
report, not what they find. The interval and verdict rules are checked on synthetic numbers."""

import json
import math
from pathlib import Path

import pytest

from delvm.cli import main
from delvm.data.store import open_store
from delvm.experiments.verdicts import interval, t975, verdict
from tests.support.tiny import untrained_cpu_tokenizer

TASKS = {"segmentation", "pose", "derain"}


# ---- intervals and verdicts on synthetic numbers ------------------------------------------------


def test_t_quantiles_match_the_tables():
    # Standard t tables, and the normal quantile as df grows.
    assert t975(1) == pytest.approx(12.7062) and t975(2) == pytest.approx(4.3027)
    assert t975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t975(120) == pytest.approx(1.9799, abs=2e-4)
    assert t975(31) < t975(30) and t975(10_000) == pytest.approx(1.96, abs=1e-3)


def test_interval_by_hand():
    ci = interval([1.0, 2.0, 3.0])  # mean 2, sd 1, half-width 4.3027 / sqrt(3)
    half = 4.3027 / math.sqrt(3)
    assert ci.mean == pytest.approx(2.0)
    assert (ci.low, ci.high) == (
        pytest.approx(2 - half, abs=1e-4),
        pytest.approx(2 + half, abs=1e-4),
    )
    single = interval([0.5])
    assert single.low == single.high == 0.5 and str(single) == "0.5000"


def test_verdicts_clear_noise_reversed():
    assert verdict([0.10, 0.12, 0.11])[1] == "reproduced"  # clear, consistent difference
    assert verdict([0.05, -0.04, 0.01])[1] == "inconclusive"  # noise around 0
    assert verdict([-0.10, -0.12, -0.09])[1] == "contradicted"  # the other direction
    assert verdict([0.3])[1] == "inconclusive"  # one seed decides nothing
    # The same mean with more spread is no longer enough.
    assert verdict([0.01, 0.21, 0.11])[1] == "inconclusive"


# ---- the studies end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    model = untrained_cpu_tokenizer(resolution=32, num_embeddings=128)
    return model.save_pretrained(tmp_path_factory.mktemp("tok") / "tok")  # 4 x 4 tokens


def argv(study: str, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["experiment", study, "--tokenizer", str(tokenizer), "--out", str(out),
            "--steps", "2", "--resolution", "32", "--segmentation", "8", "--pose", "4",
            "--derain", "4", "--eval-examples", "4", "--set", "data.seq_len=64",
            "--set", "data.val_sentences=2", "--set", "micro_batch=2", *extra]  # fmt: skip


def run(study: str, tokenizer: Path, out: Path, *extra: str) -> dict:
    assert main(argv(study, tokenizer, out, *extra)) == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert (out / "loss_curves.png").stat().st_size > 0
    for seed, arms in results["seeds"].items():
        for arm, steps in arms.items():
            for result in steps.values():
                assert set(result) == TASKS
            log = (out / f"seed-{seed}" / "arms" / arm / "log.jsonl").read_text().splitlines()
            assert max(json.loads(line)["step"] for line in log) == int(max(steps))
    for arm, described in results["arms"].items():
        assert (out / "samples" / f"{arm}.png").is_file()
        assert f"| {arm} | " in report and f"{described['parameters']:,}" in report
    assert "### Claims" in report and all(c["verdict"] in report for c in results["claims"])
    return results


@pytest.mark.slow
def test_balance_over_two_seeds(tokenizer: Path, tmp_path: Path):
    results = run("balance", tokenizer, tmp_path, "--seeds", "0", "1")
    assert list(results["seeds"]) == ["0", "1"]
    assert list(results["arms"]) == ["unbalanced", "resampled", "augmented"]
    # Each seed has its own augmented copies; the evaluation world is one for both.
    stores = [open_store(tmp_path / f"seed-{s}" / "stores" / "augment") for s in (0, 1)]
    assert all(s.balance == "augment" and s.tasks["pose"].copy.max() > 0 for s in stores)
    assert (stores[0].tasks["pose"].tokens[:] != stores[1].tasks["pose"].tokens[:]).any()
    # The seed changes the run: initial weights and data order.
    losses = {s: results["seeds"][s]["resampled"]["2"]["pose"]["target"]["loss"] for s in "01"}
    assert losses["0"] != losses["1"]
    # Re-sampled and augmented train on the same task mix; augmented draws from more examples.
    mix = {a: results["arms"][a]["mix"] for a in ("unbalanced", "resampled", "augmented")}
    for task in TASKS:
        assert mix["resampled"][task]["share"] == mix["augmented"][task]["share"] == 1 / 3
        assert mix["resampled"][task]["originals"] == mix["augmented"][task]["originals"]
    assert mix["augmented"]["pose"]["distinct"] > mix["resampled"]["pose"]["distinct"]
    assert mix["unbalanced"]["segmentation"]["share"] > 0.5
    assert [c["claim"] for c in results["claims"]][
        0
    ] == "augmented beats re-sampled on the tail tasks"
    for claim in results["claims"]:
        assert len(claim["per_seed"]) == 2 and claim["low"] <= claim["mean"] <= claim["high"]


@pytest.mark.slow
def test_data_scaling(tokenizer: Path, tmp_path: Path):
    results = run("data-scaling", tokenizer, tmp_path, "--factor", "2")
    assert list(results["arms"]) == ["real-x1", "real-x2", "augmented-c1"]
    stores = {n: open_store(tmp_path / "stores" / n) for n in ("real-x1", "real-x2")}
    stores["augmented-c1"] = open_store(tmp_path / "seed-0" / "stores" / "augmented-c1")
    assert stores["real-x2"].tasks["pose"].num_examples == 2 * 4
    assert stores["augmented-c1"].tasks["pose"].copy.max() == 1
    assert stores["augmented-c1"].tasks["derain"].copy.max() == 0
    shares = {a: results["arms"][a]["mix"]["pose"]["share"] for a in results["arms"]}
    assert set(shares.values()) == {1 / 3}  # one task mix: only the pose data differs


@pytest.mark.slow
def test_kd_teacher_keeps_its_size_under_a_whole_table_set(tokenizer: Path, tmp_path: Path):
    # Issue 25's case: --set replaces model.overrides as a whole table to size the student.
    student = "model.overrides={'hidden_size': 32, 'intermediate_size': 64, 'num_heads': 2, 'num_layers': 1, 'max_seq_len': 64}"
    results = run("kd", tokenizer, tmp_path, "--set", student, "--teacher", "hidden_size=64",
                  "intermediate_size=176", "num_heads=4", "num_layers=2",
                  "--teacher-steps", "3")  # fmt: skip
    assert list(results["arms"]) == ["teacher", "student", "student-kd"]
    arms = tmp_path / "seed-0" / "arms"
    kd_log = [
        json.loads(line) for line in (arms / "student-kd" / "log.jsonl").read_text().splitlines()
    ]
    assert all("loss_kd" in r for r in kd_log if "loss" in r)  # trained against the teacher
    steps = {"teacher": 3, "student": 2, "student-kd": 2}  # a teacher trained longer
    models = {
        a: json.loads((arms / a / "checkpoints" / f"step-{n:06d}" / "config.json").read_text())[
            "model"
        ]
        for a, n in steps.items()
    }
    assert {a: results["arms"][a]["steps"] for a in steps} == steps
    assert (models["teacher"]["hidden_size"], models["teacher"]["num_layers"]) == (64, 2)
    assert models["teacher"]["max_seq_len"] == 64  # the --set fields the teacher does not define
    for arm in ("student", "student-kd"):
        assert (models[arm]["hidden_size"], models[arm]["num_layers"]) == (32, 1)
    described = results["arms"]
    assert (described["teacher"]["hidden_size"], described["teacher"]["num_layers"]) == (64, 2)
    assert described["teacher"]["parameters"] > described["student"]["parameters"]


def test_set_that_an_arm_would_override_is_refused(tokenizer: Path, tmp_path: Path, capsys):
    assert main(argv("kd", tokenizer, tmp_path, "--set", "model.overrides.num_layers=1",
                     "--teacher", "num_layers=3")) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set model.overrides.num_layers=1" in err
    assert "arm teacher" in err and "model.overrides.num_layers=3" in err
    assert main(argv("balance", tokenizer, tmp_path / "b", "--set", "data.balance='none'")) == 2
    assert "defines arm unbalanced" in capsys.readouterr().err
    assert main(argv("balance", tokenizer, tmp_path / "c", "--set", "seed=3")) == 2
    assert "use --seeds" in capsys.readouterr().err


def test_identical_arms_are_refused(tokenizer: Path, tmp_path: Path, capsys):
    # A teacher sized exactly as the student: the study would compare a model with itself.
    assert main(argv("kd", tokenizer, tmp_path, "--teacher", "num_layers=2")) == 2
    err = capsys.readouterr().err
    assert "arms teacher and student would train the same run" in err and err.count("\n") == 1


@pytest.mark.slow
def test_continual(tokenizer: Path, tmp_path: Path):
    results = run("continual", tokenizer, tmp_path, "--steps", "3")
    assert list(results["arms"]) == ["lr-continue", "lr-rescale"]
    assert list(results["seeds"]["0"]["lr-rescale"]) == ["1", "2", "3"]  # every stage scored
    report = (tmp_path / "report.md").read_text()
    assert report.count("after each stage") == 2
    assert "lr rescaling increases forgetting" in report


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


@pytest.mark.slow
def test_reproduce_writes_one_page_and_resumes(tmp_path: Path):
    """`make reproduce` at its smallest: a 4-step tokenizer, every study for 2 steps, 2 seeds."""
    config = tmp_path / "repro.toml"
    config.write_text("""
seeds = [0, 1]
jobs = 2
[world]
segmentation = 8
pose = 4
derain = 4
[tokenizer]
model = { num_embeddings = 64 }
steps = 4
batch_size = 4
crop = 32
warmup_steps = 1
eval_every = 4
checkpoint_every = 4
val_images = 4
precision = "fp32"
[common]
segmentation = 8
pose = 4
derain = 4
eval_examples = 4
set = ["data.val_sentences=2", "micro_batch=2"]
[balance]
steps = 2
[data-scaling]
steps = 2
factor = 2
[kd]
steps = 2
teacher = ["num_layers=3"]
[continual]
steps = 3
""")
    out = tmp_path / "out"
    assert main(["experiment", "reproduce", "--config", str(config), "--out", str(out)]) == 0
    page = (out / "results.md").read_text()
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["studies"]) == ["balance", "data-scaling", "kd", "continual"]
    claims = [c for s in summary["studies"].values() for c in s["claims"]]
    assert len(claims) == 14
    for c in claims:  # in the verdicts table on top and in its study's own claims table
        assert page.count(f"| {c['claim']} ") == 2 and f"**{c['verdict']}** |" in page
    for study in summary["studies"]:
        assert f"({study}/loss_curves.png)" in page and (out / study / "loss_curves.png").is_file()
    # A rerun finds everything done and writes the same page.
    mtime = (out / "kd" / "seed-1" / "arms" / "teacher" / "log.jsonl").stat().st_mtime
    assert main(["experiment", "reproduce", "--config", str(config), "--out", str(out)]) == 0
    assert (out / "kd" / "seed-1" / "arms" / "teacher" / "log.jsonl").stat().st_mtime == mtime
