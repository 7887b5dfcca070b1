"""The pipeline through the CLI at toy scale: toy world -> store -> train -> eval, and eval's
figures checked against F.cross_entropy by hand and against the run's own validation log.
(Prompting and export through the CLI are tested in test_prompting, test_export and the
README walkthrough.)"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from delvm.cli import main
from delvm.data.sampler import SamplerConfig, SentenceSampler
from delvm.data.store import open_store
from delvm.model.checkpoint import load_model
from tests.support.tiny import untrained_cpu_tokenizer


def figures_by_hand(model, sampler: SentenceSampler) -> dict:
    """Per task and scope: mean NLL, accuracy (%) and exp(NLL) over the validation sentences,
    the target scope being the labels of the sentence's last image."""
    logits, labels = {}, {}
    with torch.no_grad():
        for ids, tasks, _ in sampler.val_batches(1):
            logits.setdefault(tasks[0], []).append(model(ids[:, :-1])[0])
            labels.setdefault(tasks[0], []).append(ids[0, 1:])
    result = {}
    for task in logits:
        x, y = torch.stack(logits[task]), torch.stack(labels[task])
        result[task] = {}
        for scope, first in (("sentence", 0), ("target", y.shape[1] - sampler.image_tokens)):
            nll = F.cross_entropy(x[:, first:].flatten(0, 1), y[:, first:].flatten()).item()
            accuracy = 100 * (x[:, first:].argmax(-1) == y[:, first:]).float().mean().item()
            result[task][scope] = {"loss": nll, "accuracy": accuracy, "perplexity": math.exp(nll)}
    return result


def flat(result: dict) -> dict:
    """{task: {scope: {figure: value}}} as {(task, scope, figure): value}, for pytest.approx."""
    return {
        (t, s, f): v
        for t, scopes in result.items()
        for s, fs in scopes.items()
        for f, v in fs.items()
    }


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
                 "precision='fp32'", "data.seq_len=64", "steps=4", "checkpoint_every=2",
                 "eval_every=2", "data.val_fraction=0.2", "data.val_sentences=2"]  # fmt: skip
    assert main(["train", "tiny", *overrides]) == 0
    ckpt = run / "checkpoints" / "step-000004"
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
    assert main(["train", "tiny", *overrides[:-3], "steps=6"]) == 2  # data changed
    capsys.readouterr()

    # No split flags: eval takes the run's (seq_len 64, val_fraction 0.2, 2 sentences, seed 0).
    assert main(["eval", str(ckpt), "--store", str(tmp_path / "store"),
                 "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    assert "| task |" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"segmentation", "pose", "derain"}
    # The same held-out sentences as the run's validation: the trainer logged these figures at
    # step 4 with the same weights.
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    logged = next(r["val"] for r in log if r.get("step") == 4 and "val" in r)
    assert flat(metrics) == pytest.approx(flat(logged), rel=1e-5)
    # And each figure is what F.cross_entropy and argmax give on those sentences.
    split = SamplerConfig(seq_len=64, balance="none", val_fraction=0.2, val_sentences=2)
    sampler = SentenceSampler(open_store(tmp_path / "store"), split)
    assert sampler.image_tokens == 16
    by_hand = figures_by_hand(load_model(ckpt).eval(), sampler)
    assert flat(metrics) == pytest.approx(flat(by_hand), rel=1e-5)
