"""The optional extras (pyproject): `video` (PyAV) and `tensorboard` are imported only where used,
and a core install without them runs everything else."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from delvm.data.sources import iter_video
from delvm.errors import DelvmError
from delvm.train.config import load_config
from delvm.train.trainer import Trainer
from tests.support.sentences import PatternSentences

EXTRAS = ("av", "tensorboard")


@pytest.mark.slow  # a fresh interpreter imports every verb
def test_no_verb_imports_an_extra_until_it_is_used():
    # A fresh interpreter: this one has the extras imported by other tests.
    script = (
        "import sys\n"
        "from delvm.cli import build_parser\n"
        "import delvm.train.trainer, delvm.classify.train, delvm.data.sources\n"
        "build_parser()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EXTRAS!r}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_training_without_tensorboard_warns_and_logs_to_jsonl(tmp_path, monkeypatch):
    # What `import` does where the tensorboard package is not installed.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    config = load_config(None, [
        f"out={str(tmp_path / 'run')!r}", "steps=2", "micro_batch=2", "log_every=1",
        "tensorboard=true", "precision='fp32'", "data.seq_len=65", "model.preset='tiny'",
        "model.overrides={'vocab_size': 64, 'codebook_dim': 16}",
    ])  # fmt: skip
    with pytest.warns(UserWarning, match=r"pip install 'delvm\[tensorboard\]'"):
        Trainer(config, PatternSentences()).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_video_files_without_pyav_name_the_extra_and_frame_folders_still_work(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` does where PyAV is missing
    frames = tmp_path / "walk"
    frames.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(frames / f"frame_{i}.png")
    (clip,) = list(iter_video(frames, frames_per_clip=4))
    assert [int(image[0, 0, 0]) for image in clip.images] == [0, 60, 120, 180]
    (tmp_path / "walk.mp4").write_bytes(b"not decoded: refused before reading")
    with pytest.raises(
        DelvmError, match=r"walk\.mp4: reading video files needs PyAV: pip install 'delvm\[video\]'"
    ):
        iter_video(tmp_path)
