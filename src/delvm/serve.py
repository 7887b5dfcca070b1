"""`delvm serve`: a local web page (Gradio) for visual prompting.

Pick a toy-world task's preloaded example pairs or upload your own, add a query image, choose
how to sample, and see the generated answer next to the prompt. Gradio is imported only when a
page is built, so `delvm --help` and the other verbs stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from delvm.data.images import load_square
from delvm.errors import DelvmError
from delvm.inference.generate import SamplingConfig
from delvm.inference.prompting import (
    VisualPrompter,
    add_checkpoint_arguments,
    add_compile_argument,
    make_grid,
)

if TYPE_CHECKING:
    import gradio as gr

Pair = tuple[np.ndarray, np.ndarray]
UPLOAD = "upload my own"
UPLOAD_PAIRS = 3  # example-pair slots on the page
PRELOAD_PAIRS = 3  # preloaded pairs per task (plus one held-out query)


@dataclass(frozen=True)
class UploadLimits:
    """Uploads past these are refused before they are decoded."""

    max_bytes: int = 10 * 1024**2
    max_side: int = 4096


@dataclass(frozen=True)
class TaskExamples:
    pairs: list[Pair]
    query: np.ndarray


def toyworld_examples(size: int, pairs: int = PRELOAD_PAIRS) -> dict[str, TaskExamples]:
    """Per toy-world task, `pairs` example pairs and a query, rendered at `size` px."""
    from delvm.data.toyworld import TASKS, ToyWorldConfig, toyworld_example

    config = ToyWorldConfig(resolution=size)
    examples = {}
    for task in TASKS:
        images = [toyworld_example(config, task, i).images for i in range(pairs + 1)]
        examples[task] = TaskExamples([(i[0], i[1]) for i in images[:pairs]], images[pairs][0])
    return examples


def folder_examples(root: Path, size: int, pairs: int = PRELOAD_PAIRS) -> dict[str, TaskExamples]:
    """Pairs from a `delvm data toyworld` folder: ROOT/<task>/{input,target}/NAME.png."""
    examples = {}
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        inputs = sorted((task_dir / "input").glob("*.png"))
        matched = [p for p in inputs if (task_dir / "target" / p.name).is_file()][: pairs + 1]
        if len(matched) < 2:  # a task needs at least one pair and a query
            continue
        loaded = [
            (load_square(p, size), load_square(task_dir / "target" / p.name, size)) for p in matched
        ]
        examples[task_dir.name] = TaskExamples(loaded[:-1], loaded[-1][0])
    if not examples:
        raise DelvmError(
            f"{root}: no task folders with input/*.png and matching target/*.png "
            "(write one with `delvm data toyworld`)"
        )
    return examples


def check_upload(path: str | Path, what: str, limits: UploadLimits) -> None:
    """Raise DelvmError if an uploaded file is too big, too large in pixels or not an image."""
    size = Path(path).stat().st_size
    if size > limits.max_bytes:
        raise DelvmError(
            f"{what}: {size / 2**20:.1f} MB is over the {limits.max_bytes / 2**20:.1f} MB "
            "upload limit"
        )
    try:
        # Image.open reads only the header, so a huge image is refused before it is decoded.
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, Image.DecompressionBombError) as err:
        raise DelvmError(f"{what}: not a readable image ({err})") from None
    if max(width, height) > limits.max_side:
        raise DelvmError(
            f"{what}: {width}x{height} px is over the {limits.max_side} px limit per side"
        )


def sampling_config(
    mode: str, temperature: float, top_k: float | None, top_p: float, seed: float | None
) -> SamplingConfig:
    """The page's sampling widgets as a SamplingConfig (top-k 0 and top-p 1 mean off)."""
    if mode == "greedy":
        return SamplingConfig(temperature=0)
    return SamplingConfig(
        temperature=temperature,
        top_k=int(top_k) if top_k else None,
        top_p=top_p if top_p < 1 else None,
        seed=None if seed is None else int(seed),
    )


def generate(
    prompter: VisualPrompter,
    examples: dict[str, TaskExamples],
    limits: UploadLimits,
    source: str,
    query: str | None,
    uploads: Sequence[tuple[str | None, str | None]],
    sampling: SamplingConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """The page's Generate button: (output image, grid of examples | query | output).

    `source` is a task of `examples` or UPLOAD; `query` and `uploads` are uploaded file paths
    (None where empty). A preloaded task uses its own query unless one is uploaded.
    """
    if query is not None:
        check_upload(query, "query image", limits)
        query_image = prompter.pixels(query)
    elif source in examples:
        query_image = examples[source].query
    else:
        raise DelvmError("upload a query image")
    if source in examples:
        # As many preloaded pairs as the model's context holds with the query and its answer.
        fits = (prompter.model.config.max_seq_len // prompter.image_tokens - 2) // 2
        pairs = examples[source].pairs[: max(fits, 1)]
    else:
        pairs = []
        for i, (image_in, image_out) in enumerate(uploads, 1):
            if (image_in is None) != (image_out is None):
                raise DelvmError(f"example {i}: upload both its input and its output")
            if image_in is not None:
                check_upload(image_in, f"example {i} input", limits)
                check_upload(image_out, f"example {i} output", limits)
                pairs.append((prompter.pixels(image_in), prompter.pixels(image_out)))
        if not pairs:
            raise DelvmError("upload at least one example pair (input and output)")
    output = prompter(pairs, [query_image], sampling)[0]
    grid = make_grid([[image for pair in pairs for image in pair] + [query_image, output]])
    return output, grid


def on_generate(
    prompter: VisualPrompter,
    examples: dict[str, TaskExamples],
    limits: UploadLimits,
    source: str,
    query: str | None,
    mode: str,
    temperature: float,
    top_k: float | None,
    top_p: float,
    seed: float | None,
    *files: str | None,
) -> tuple[np.ndarray, np.ndarray]:
    """`generate` as the page calls it: `files` are the upload slots (in, out, in, out, ...)."""
    import gradio as gr

    uploads = list(zip(files[::2], files[1::2], strict=True))
    try:
        sampling = sampling_config(mode, temperature, top_k, top_p, seed)
        return generate(prompter, examples, limits, source, query, uploads, sampling)
    except DelvmError as err:
        raise gr.Error(str(err)) from None  # shown in the page; the server carries on


def build_app(
    prompter: VisualPrompter, examples: dict[str, TaskExamples], limits: UploadLimits
) -> gr.Blocks:
    """The page. Launch it with `launch`, which also applies the upload limit to Gradio."""
    import gradio as gr

    def on_source(source):
        if source not in examples:
            return []
        task = examples[source]
        return [image for pair in task.pairs for image in pair] + [task.query]

    choices = [*examples, UPLOAD]
    with gr.Blocks(title="delvm visual prompting", analytics_enabled=False) as app:
        gr.Markdown(
            "## Visual prompting\nExample pairs show the task; the model answers the query. "
            f"Uploads: at most {limits.max_bytes / 2**20:.0f} MB and {limits.max_side} px "
            "per side; images are resized and centre-cropped to "
            f"{prompter.size}x{prompter.size}."
        )
        with gr.Row():
            with gr.Column():
                source = gr.Dropdown(choices, value=choices[0], label="Examples", elem_id="source")
                preview = gr.Gallery(
                    on_source(choices[0]), label="Preloaded pairs, then query", columns=8
                )
                with gr.Accordion("Your own examples", open=False):
                    files = []
                    for i in range(1, UPLOAD_PAIRS + 1):
                        with gr.Row():
                            for side in ("input", "output"):
                                files.append(
                                    gr.Image(
                                        type="filepath",
                                        sources=["upload"],
                                        label=f"Example {i} {side}",
                                        elem_id=f"example-{i}-{side}",
                                    )
                                )
                query = gr.Image(
                    type="filepath",
                    sources=["upload"],
                    label="Query (optional for a preloaded task)",
                    elem_id="query",
                )
            with gr.Column():
                mode = gr.Radio(["greedy", "sample"], value="greedy", label="Decoding")
                temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature")
                top_k = gr.Number(0, precision=0, minimum=0, label="Top-k (0 = off)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (1 = off)")
                seed = gr.Number(0, precision=0, label="Seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                output = gr.Image(label="Output", format="png", elem_id="output")
                grid = gr.Image(label="Examples | query | output", format="png", elem_id="grid")
        source.change(on_source, source, preview)
        button.click(
            partial(on_generate, prompter, examples, limits),
            [source, query, mode, temperature, top_k, top_p, seed, *files],
            [output, grid],
        )
    return app


def launch(
    app: gr.Blocks,
    limits: UploadLimits,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
) -> None:
    """Serve `app`; Gradio itself also refuses uploads over `limits.max_bytes`."""
    app.queue(default_concurrency_limit=1)  # one generation at a time: the model is shared
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=limits.max_bytes,
        prevent_thread_lock=not block,
        ssr_mode=False,  # server-side rendering needs Node.js
        quiet=not block,
    )


# ---- command line ------------------------------------------------------------------------------


def _run_serve(args) -> None:
    from delvm.inference.prompting import load_prompter

    try:
        import gradio  # noqa: F401  (checked before the model loads)
    except ImportError:
        raise DelvmError(
            "delvm serve needs Gradio, an optional extra: pip install -e '.[serve]' in the "
            "repository (make test installs it too)"
        ) from None
    prompter = load_prompter(
        args.checkpoint, args.tokenizer, args.device, args.dtype, compile=args.compile
    )
    if args.examples is None:
        examples = toyworld_examples(prompter.size)
    else:
        examples = folder_examples(args.examples, prompter.size)
    limits = UploadLimits(round(args.max_upload_mb * 2**20), args.max_side)
    launch(build_app(prompter, examples, limits), limits, args.host, args.port)


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="a local web page for visual prompting")
    add_checkpoint_arguments(p)
    add_compile_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--examples", type=Path, default=None, metavar="DIR",
                   help="a `delvm data toyworld` folder (default: generate toy-world pairs)")  # fmt: skip
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload file")
    p.add_argument("--max-side", type=int, default=4096, help="largest upload side in px")
    p.set_defaults(func=_run_serve)
