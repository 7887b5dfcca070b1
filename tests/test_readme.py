"""The README's commands work as written.

- Every ```bash block, in order, runs in one scratch folder (shipped configs reached by name,
  the venv's bin on PATH) with `bash -euo pipefail`: the walkthrough from toy world to export.
- Every `delvm ...` / `torchrun ... -m delvm.cli ...` line of the other blocks (```console,
  ```text, or a block after `<!-- not run: reason -->`), which need GPUs, real data sets or the
  published checkpoints, is parsed by delvm's own argument parser, so their flags stay right.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from delvm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not run\b")

# What the walkthrough leaves behind, relative to its folder.
EXPECTED = [
    "world/toyworld.json",
    "world/pose/keypoints.json",
    "tokrun/tokenizer/config.json",
    "tokrun/report.json",
    "recon/derain_000000.png",
    "store/manifest.json",
    "store/report.json",
    "store-sample.png",
    "run/checkpoints/step-000010/model.safetensors",
    "run/log.jsonl",
    "kd/checkpoints/step-000004/model.safetensors",
    "evaluation/metrics.json",
    "evaluation/metrics.md",
    "prompted/grid.png",
    "prompted/segmentation_000001_output.png",
    "prompted/segmentation_000002_output.png",
    "inpainted/grid.png",
    "hf/config.json",
    "hf/model.safetensors",
]


def readme_blocks() -> list[tuple[str, bool, int, str]]:
    """(language, runnable, first line number, text) of every fenced block, in order."""
    blocks, lines = [], README.read_text().splitlines()
    i, skip_next = 0, False
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            if NOT_RUN.search(lines[i]):
                skip_next = True
            i += 1
            continue
        language, start = match.group(1), i + 1
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        blocks.append((language, language == "bash" and not skip_next, start + 1,
                       "\n".join(lines[start:i]) + "\n"))  # fmt: skip
        skip_next = False
        i += 1
    return blocks


def command_lines(text: str) -> list[list[str]]:
    """Each shell command of a block as words (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.splitlines():
        if line.strip().startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        if words and words[0] in ("$", ">"):
            words = words[1:]
        if words:
            commands.append(words)
    return commands


def delvm_arguments(words: list[str]) -> list[str] | None:
    """The arguments delvm's parser sees, for `delvm ARGS` or `torchrun ... -m delvm.cli ARGS`."""
    if words[0] == "delvm":
        return words[1:]
    if words[0] == "torchrun" and "delvm.cli" in words:
        at = words.index("delvm.cli")
        assert words[at - 1] == "-m", f"torchrun line without `-m delvm.cli`: {shlex.join(words)}"
        return words[at + 1 :]
    return None


def test_readme_has_a_walkthrough_and_the_results_placeholder():
    blocks = readme_blocks()
    runnable = [text for _language, run, _line, text in blocks if run]
    assert len(runnable) >= 8
    assert "<!-- results: filled by the maintainers -->" in README.read_text()
    # No command names a block language the test would silently skip.
    assert {language for language, *_ in blocks} <= {"bash", "console", "text", ""}


def test_every_delvm_command_line_parses():
    parser = build_parser()
    checked = 0
    for _language, _run, line, text in readme_blocks():
        # The heredoc body of a bash block is a file, not commands.
        text = re.sub(r"<<'EOF'\n.*?\nEOF\n", "\n", text, flags=re.S)
        for words in command_lines(text):
            arguments = delvm_arguments(words)
            if arguments is None:
                continue
            try:
                parser.parse_args(arguments)
            except SystemExit:
                pytest.fail(f"README block at line {line}: delvm rejects {shlex.join(words)}")
            checked += 1
    assert checked >= 30


@pytest.mark.slow
def test_readme_walkthrough_runs(tmp_path: Path):
    work = tmp_path / "scratch"
    work.mkdir()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    timings = []
    for _language, run, line, text in readme_blocks():
        if not run:
            continue
        start = time.perf_counter()
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", text], cwd=work, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        timings.append((line, time.perf_counter() - start))
        assert result.returncode == 0, (
            f"README bash block at line {line} failed ({result.returncode}):\n{text}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
    missing = [name for name in EXPECTED if not (work / name).exists()]
    assert not missing, f"the walkthrough did not write {missing}"
    print("README blocks (line, seconds):", [(line, round(s, 1)) for line, s in timings])
