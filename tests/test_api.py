"""The Python API and self-describing runs and exports, on a tiny run trained through the CLI.

- `import delvm` gives load_prompter / load_model / load_tokenizer / VisualLM, lazily;
- the quickstart snippet (README, `delvm.__doc__`) runs exactly as written;
- a run folder names its latest checkpoint, and every verb that takes a checkpoint takes the run;
- `delvm eval RUN` evaluates on the run's own held-out sentences without being told the split;
- an export carries its tokenizer and a model card, and is prompted alone after the run is gone.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import delvm
from delvm.cli import main
from delvm.errors import DelvmError
from delvm.inference.generate import SamplingConfig
from delvm.inference.prompting import VisualPrompter, load_prompter
from delvm.model.checkpoint import (
    checkpoint_tokenizer,
    load_model,
    save_model,
    tokenizer_fingerprint,
)
from delvm.tokenizer import load_tokenizer
from delvm.train.state import resolve_checkpoint
from tests.support.tiny_run import SPLIT, train_tiny_run

QUICKSTART = """\
import delvm
prompter = delvm.load_prompter("run")  # a run folder, a checkpoint or an export
answers = prompter([("in.png", "out.png")], ["query.png"])  # one RGB uint8 array per query
"""
GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    paths = train_tiny_run(folder)
    for i, name in enumerate(["in", "out", "query", "query2"]):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return {**paths, "folder": folder}


def test_import_delvm_is_cheap_and_exports_the_api():
    code = "import sys, delvm; assert 'torch' not in sys.modules, 'import delvm loaded torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert sorted(delvm.__all__) == sorted(delvm._API)
    assert delvm.load_prompter is load_prompter and delvm.load_model is load_model
    assert delvm.load_tokenizer is load_tokenizer
    assert delvm.VisualLM.__name__ == "VisualLM" and delvm.VisualPrompter is VisualPrompter
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        delvm.nope  # noqa: B018


def test_quickstart_runs_exactly_as_written(tiny, monkeypatch):
    for line in QUICKSTART.splitlines():  # the package docstring shows the same lines
        assert f"    {line}\n" in delvm.__doc__, line
    monkeypatch.chdir(tiny["folder"])
    scope = {}
    exec(QUICKSTART, scope)
    answers = scope["answers"]
    assert len(answers) == 1 and answers[0].shape == (32, 32, 3) and answers[0].dtype == np.uint8
    # The same as a prompter built by hand from the run's latest checkpoint and its tokenizer
    # (on a CPU, `auto` prefills in fp32 and decodes with bf16 copies of the weights).
    latest = tiny["run"] / "checkpoints" / "step-000004"
    by_hand = VisualPrompter(load_model(latest).eval(), load_tokenizer(tiny["tokenizer"]),
                             torch.bfloat16, tokenizer_fingerprint(latest))  # fmt: skip
    expected = by_hand([("in.png", "out.png")], ["query.png"], GREEDY)
    assert np.array_equal(answers[0], expected[0])


def test_a_run_folder_names_its_latest_checkpoint(tiny, tmp_path):
    run = tiny["run"]
    assert (run / "checkpoints" / "latest").read_text() == "step-000004\n"
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000004"
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "checkpoints" / "latest").write_text("step-000002\n")  # the file decides
    assert resolve_checkpoint(copy) == copy / "checkpoints" / "step-000002"
    (copy / "checkpoints" / "latest").unlink()  # a run from before `latest`: the newest step
    assert resolve_checkpoint(copy) == copy / "checkpoints" / "step-000004"
    with pytest.raises(DelvmError, match="no such checkpoint or run folder"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(DelvmError, match="nor a run folder"):
        resolve_checkpoint(tiny["store"])
    # load_model (and so distill.teacher and init_from) reads the run's latest weights.
    from_run, from_step = load_model(run).state_dict(), load_model(resolve_checkpoint(run))
    assert all(torch.equal(v, from_step.state_dict()[k]) for k, v in from_run.items())
    assert checkpoint_tokenizer(run) == tiny["tokenizer"]


def test_every_prompting_verb_takes_the_run_folder_and_finds_its_tokenizer(tiny, tmp_path):
    run, f = str(tiny["run"]), tiny["folder"]
    out = tmp_path / "prompted"
    assert main(["prompt", run, "--examples", str(f / "in.png"), str(f / "out.png"),
                 "--query", str(f / "query.png"), str(f / "query2.png"), "--batch-size", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    assert (out / "query_output.png").is_file() and (out / "query2_output.png").is_file()
    assert main(["inpaint", run, str(f / "in.png"), "--out", str(tmp_path / "inp")]) == 0
    assert (tmp_path / "inp" / "in_inpainted.png").is_file()
    assert main(["next-frame", run, str(f / "in.png"), str(f / "out.png"),
                 "--out", str(tmp_path / "next")]) == 0  # fmt: skip
    assert (tmp_path / "next" / "next_frame.png").is_file()


def test_the_dtype_reaches_the_weights_and_the_kv_cache(tiny):
    auto = load_prompter(tiny["run"])  # CPU: fp32 weights, bf16 copies for decoding
    assert auto.model.head.weight.dtype == torch.float32
    assert auto.generator.decoder.head.weight.dtype == torch.bfloat16
    fp32 = load_prompter(tiny["run"], dtype="fp32")
    assert fp32.generator.decoder is fp32.model
    bf16 = load_prompter(tiny["run"], dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert all(k.dtype == torch.bfloat16 for k in bf16.model.new_cache(1).keys)
    answers = bf16([(tiny["folder"] / "in.png", tiny["folder"] / "out.png")],
                   [tiny["folder"] / "query.png"], GREEDY)  # fmt: skip
    assert answers[0].shape == (32, 32, 3)


def logged_validation(run: Path, step: int) -> dict:
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return next(r["val"] for r in records if r.get("step") == step and "val" in r)


def test_eval_of_a_run_folder_uses_the_runs_own_held_out_sentences(tiny, tmp_path, capsys):
    assert main(["eval", str(tiny["run"]), "--out", str(tmp_path / "ev")]) == 0  # no flags
    printed = capsys.readouterr().out
    assert f"seed {SPLIT['seed']}" in printed  # it says which split it took
    ours = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    trained = logged_validation(tiny["run"], 4)  # what the trainer measured at its last step
    assert set(ours) == set(trained) == {"segmentation", "pose", "derain"}
    for task, scopes in trained.items():
        for scope, metrics in scopes.items():
            for name, value in metrics.items():
                assert ours[task][scope][name] == pytest.approx(value, rel=1e-5), (task, name)
    # Flags still override: the default split holds out other sentences, so other numbers.
    assert main(["eval", str(tiny["run"]), "--seed", "0", "--val-fraction", "0.05",
                 "--val-sentences", "16", "--out", str(tmp_path / "other")]) == 0  # fmt: skip
    other = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert other["pose"]["sentence"]["loss"] != pytest.approx(ours["pose"]["sentence"]["loss"])


def test_eval_without_a_run_asks_for_the_store(tiny, tmp_path, capsys):
    bare = tmp_path / "bare"  # a model folder without training state, so without a run config
    save_model(load_model(tiny["run"]), bare, tokenizer_fingerprint(tiny["run"]))
    assert main(["eval", str(bare)]) == 2
    assert "pass --store STORE" in capsys.readouterr().err
    assert main(["eval", str(bare), "--store", str(tiny["store"]), "--seq-len", "64"]) == 0


def test_an_export_alone_is_prompted_after_the_run_is_gone(tiny, tmp_path):
    work = shutil.copytree(tiny["folder"], tmp_path / "work")  # run, tok, store, images
    images = tmp_path / "images"
    images.mkdir()
    for name in ("in", "out", "query"):
        shutil.copy(work / f"{name}.png", images)
    pairs, queries = [(images / "in.png", images / "out.png")], [images / "query.png"]
    before = load_prompter(work / "run", dtype="fp32")(pairs, queries, GREEDY)
    assert main(["export-hf", str(work / "run"), str(work / "hf")]) == 0
    moved = Path(shutil.move(work / "hf", tmp_path / "elsewhere"))
    shutil.rmtree(work)  # the run, its tokenizer and its store are gone

    card = (moved / "README.md").read_text()
    tokenizer = load_tokenizer(moved / "tokenizer")
    assert f"fingerprint {tokenizer.fingerprint()}" in card
    params = sum(p.numel() for p in load_model(tiny["run"]).parameters())
    assert f"parameters: {params:,}" in card
    assert "balance augment, seed 7" in card and "task pose: 8 examples" in card
    loss = logged_validation(tiny["run"], 4)["pose"]["sentence"]["loss"]
    assert f"| pose | {loss:.4f} |" in card

    after = load_prompter(moved, dtype="fp32")(pairs, queries, GREEDY)
    assert np.array_equal(before[0], after[0])
    out = tmp_path / "answers"
    assert main(["prompt", str(moved), "--examples", str(pairs[0][0]), str(pairs[0][1]),
                 "--query", str(queries[0]), "--dtype", "fp32", "--out", str(out)]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out / "query_output.png")), before[0])


def test_export_refuses_a_tokenizer_the_model_was_not_trained_with(tiny, tmp_path, capsys):
    other = load_tokenizer(tiny["tokenizer"])
    with torch.no_grad():
        other.codebook.add_(1.0)  # same shape and codes, other weights: another fingerprint
    other.save_pretrained(tmp_path / "other")
    args = ["export-hf", str(tiny["run"]), str(tmp_path / "hf"), "--tokenizer"]
    assert main([*args, str(tmp_path / "other")]) == 2
    assert "pass the tokenizer it was trained with" in capsys.readouterr().err


def test_serve_loads_the_run_folder_too(tiny, tmp_path, capsys):
    (tmp_path / "none").mkdir()  # the model loads from the run, then the empty folder is refused
    assert main(["serve", str(tiny["run"]), "--examples", str(tmp_path / "none")]) == 2
    assert "no task folders" in capsys.readouterr().err


def test_eval_in_bf16_is_close_to_fp32(tiny, tmp_path):
    for dtype in ("fp32", "bf16"):
        assert (
            main(["eval", str(tiny["run"]), "--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
        )
    fp32, bf16 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("fp32", "bf16"))
    for task in fp32:
        loss = fp32[task]["sentence"]["loss"]
        assert bf16[task]["sentence"]["loss"] == pytest.approx(loss, abs=0.05)
