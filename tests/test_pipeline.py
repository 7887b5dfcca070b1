"""The whole pipeline through the CLI at toy scale: toy world -> store -> train -> eval ->
prompt -> export. Small and random-weighted; it checks the parts fit, not what they learn."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaForCausalLM

from delvm.cli import main
from delvm.model.checkpoint import load_model
from tests.support.tiny import untrained_cpu_tokenizer


@pytest.mark.slow
def test_toy_pipeline_end_to_end(tmp_path: Path, capsys):
    tokenizer = untrained_cpu_tokenizer(resolution=32, num_embeddings=128)
    tok = tokenizer.save_pretrained(tmp_path / "tok")  # 32 px, f8 -> 4 x 4 tokens
    build = tmp_path / "build.toml"
    build.write_text(
        f'out = "{tmp_path / "store"}"\ntokenizer = "{tok}"\nbalance = "augment"\nshard_size = 8\n'
        '[[sources]]\nformat = "toyworld"\nresolution = 32\nsegmentation = 24\npose = 6\n'
        "derain = 6\n"
    )
    assert main(["data", "build", str(build)]) == 0

    run = tmp_path / "run"
    overrides = [f"out='{run}'", f"data.store='{tmp_path / 'store'}'", f"tokenizer='{tok}'",
                 "data.seq_len=64", "steps=4", "checkpoint_every=2", "eval_every=2",
                 "data.val_fraction=0.2", "data.val_sentences=2"]  # fmt: skip
    assert main(["train", "configs/tiny.toml", *overrides]) == 0
    ckpt = run / "checkpoints" / "step-000004"
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
    assert main(["train", "configs/tiny.toml", *overrides[:-3], "steps=6"]) == 2  # data changed
    capsys.readouterr()

    assert main(["eval", str(ckpt), "--store", str(tmp_path / "store"), "--seq-len", "64",
                 "--val-fraction", "0.2", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"segmentation", "pose", "derain"}
    assert "| task |" in capsys.readouterr().out

    images = []
    for i in range(3):
        images.append(tmp_path / f"q{i}.png")
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(images[-1])
    assert main(["prompt", str(ckpt), "--tokenizer", str(tok), "--examples", str(images[0]),
                 str(images[1]), "--query", str(images[2]), "--out", str(tmp_path / "p")]) == 0  # fmt: skip
    assert (tmp_path / "p" / "grid.png").is_file()

    assert main(["export-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        assert (hf(ids).logits - load_model(ckpt)(ids)).abs().max() < 1e-4
