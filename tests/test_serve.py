"""`delvm serve`: the page end to end in a headless Chromium, and its upload limits."""

import io
import os
import shutil
import socket
import sys

import numpy as np
import pytest
from PIL import Image

from delvm.cli import main
from delvm.errors import DelvmError
from delvm.inference.generate import SamplingConfig
from delvm.inference.prompting import VisualPrompter, make_grid
from delvm.model.checkpoint import save_model
from delvm.serve import (
    UPLOAD,
    UploadLimits,
    build_app,
    folder_examples,
    launch,
    on_generate,
    toyworld_examples,
)
from tests.support.tiny import tiny_tokenizer_and_model

CHROMIUM = shutil.which("chromium")  # the system's: Playwright cannot download its own here
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def prompter():
    tokenizer, model = tiny_tokenizer_and_model()
    return VisualPrompter(model, tokenizer)


@pytest.fixture(scope="module")
def prompt_sensitive_prompter():
    """A page that answered another prompt must not go unnoticed."""
    tokenizer, model = tiny_tokenizer_and_model(prompt_sensitive=True)
    return VisualPrompter(model, tokenizer)


@pytest.fixture(scope="module")
def examples():
    return toyworld_examples(32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_browser() -> None:
    """CI (DELVM_REQUIRE_BROWSER=1) must run the browser test; elsewhere it may skip."""
    if CHROMIUM:
        return
    if os.environ.get("DELVM_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not on PATH: apt-get install chromium")
    pytest.skip("chromium is not on PATH (apt-get install chromium)")


# gradio's queue trips pandas 3 deprecation warnings; not ours to fix.
@pytest.mark.filterwarnings("ignore:::gradio.queueing")
def test_page_generates_from_preloaded_examples(prompt_sensitive_prompter, examples):
    require_browser()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    prompter, limits = prompt_sensitive_prompter, UploadLimits()
    app = build_app(prompter, examples, limits)
    port = free_port()
    launch(app, limits, port=port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            # Not "load": that would wait on web fonts the page may fail to reach offline.
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("#source input").click()
            page.get_by_role("option", name="pose").click()
            chosen = page.locator("#source input").input_value()
            page.locator("#generate").click()
            image = page.locator("#output img")
            image.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => document.querySelector('#output img').naturalWidth > 0", timeout=60_000
            )
            shown = {
                name: page.request.get(page.locator(f"#{name} img").get_attribute("src")).body()
                for name in ("output", "grid")
            }
            browser.close()
    finally:
        app.close()
    assert chosen == "pose"
    # What the page shows is the prompter's own greedy answer to the pose task's first two pairs
    # (all the tiny context holds) and its query, and the grid of those images.
    task = examples["pose"]
    expected = prompter(task.pairs[:2], [task.query], SamplingConfig(temperature=0))[0]
    output = np.asarray(Image.open(io.BytesIO(shown["output"])).convert("RGB"))
    assert np.array_equal(output, expected)
    grid = np.asarray(Image.open(io.BytesIO(shown["grid"])).convert("RGB"))
    assert np.array_equal(grid, make_grid([[*task.pairs[0], *task.pairs[1], task.query, expected]]))


def test_oversized_uploads_are_refused(prompter, examples, tmp_path):
    gr = pytest.importorskip("gradio")
    small, wide = tmp_path / "small.png", tmp_path / "wide.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(small)
    Image.fromarray(np.zeros((8, 5000, 3), np.uint8)).save(wide)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    greedy = ("greedy", 1.0, 0, 1.0, 0)

    def run(limits, query, *files):
        return on_generate(prompter, examples, limits, UPLOAD, str(query), *greedy, *files)

    with pytest.raises(gr.Error, match="query image: .* MB is over the .* MB upload limit"):
        run(UploadLimits(max_bytes=10), small, small, small)
    with pytest.raises(gr.Error, match="example 1 output: 5000x8 px is over the 4096 px"):
        run(UploadLimits(), small, str(small), str(wide))
    with pytest.raises(gr.Error, match="query image: not a readable image"):
        run(UploadLimits(), tmp_path / "junk.png")
    with pytest.raises(gr.Error, match="upload both"):
        run(UploadLimits(), small, str(small), None)
    output, grid = run(UploadLimits(), small, str(small), str(small))
    assert output.shape == (32, 32, 3) and grid.shape == (32, 4 * 32 + 3 * 4, 3)


def test_examples_folder_pairs_inputs_with_targets_by_name(prompter, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):  # c has no target: not a pair
        for side in ("input", "target") if name != "c" else ("input",):
            (tmp_path / "pose" / side).mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "pose" / side / f"{name}.png")
    (tmp_path / "empty" / "input").mkdir(parents=True)
    examples = folder_examples(tmp_path, 32)
    assert list(examples) == ["pose"] and len(examples["pose"].pairs) == 1
    assert examples["pose"].query.shape == (32, 32, 3)
    with pytest.raises(DelvmError, match="no task folders"):
        folder_examples(tmp_path / "empty", 32)


def test_serve_cli_reports_a_bad_examples_folder(prompter, tmp_path, capsys):
    prompter.tokenizer.save_pretrained(tmp_path / "tok")
    save_model(
        prompter.model, tmp_path / "ckpt", tokenizer_fingerprint=prompter.tokenizer.fingerprint()
    )
    (tmp_path / "none").mkdir()
    args = ["serve", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok")]
    assert main([*args, "--examples", str(tmp_path / "none")]) == 2
    assert "no task folders" in capsys.readouterr().err


def test_serve_without_gradio_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    args = ["serve", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok")]
    assert main(args) == 2
    assert ".[serve]" in capsys.readouterr().err
