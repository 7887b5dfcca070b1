"""Visual prompting: example pairs + a query image in, the generated answer image out.

A prompt is a visual sentence missing its last image: (input_1, output_1, ..., input_k,
output_k, query). The model continues it by one image's worth of tokens, which the tokenizer
decodes. The same machinery continues a half image (inpainting, the paper's Appendix D) and a
clip of frames (next-frame prediction). Many queries run ``batch_size`` at a time, so memory
stays bounded however many there are.

    import delvm
    prompter = delvm.load_prompter("run")  # a run folder, a checkpoint or an export
    answers = prompter([("in.png", "out.png")], ["query.png"])  # one RGB uint8 array per query
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from delvm.data.images import load_square
from delvm.devices import (
    GENERATING_DTYPES,
    add_device_argument,
    add_dtype_argument,
    inference_dtype,
    resolve_device,
)
from delvm.errors import DelvmError
from delvm.inference.generate import Generator, SamplingConfig, prefill
from delvm.model.transformer import VisualLM
from delvm.tokenizer import VQGAN

ImageLike = np.ndarray | str | Path  # RGB uint8 [H, W, 3] or an image file


class VisualPrompter:
    """Prompts a model whose token ids are ``tokenizer``'s codes, ``batch_size`` queries at a
    time (greedy outputs do not depend on it)."""

    def __init__(
        self,
        model: VisualLM,
        tokenizer: VQGAN,
        decode_dtype: torch.dtype | None = None,
        model_fingerprint: str | None = None,
        batch_size: int = 16,
        draft: VisualLM | None = None,
        draft_tokens: int = 4,
        compile: bool = False,
        draft_threshold: float = 0.0,
    ):
        if batch_size < 1:
            raise DelvmError(f"batch size must be >= 1, got {batch_size}")
        if model.config.codes != tokenizer.num_codes:
            raise DelvmError(
                f"the model predicts {model.config.codes} codes but the tokenizer has "
                f"{tokenizer.num_codes}; use the tokenizer the model was trained with"
            )
        if model_fingerprint and model_fingerprint != tokenizer.fingerprint():
            raise DelvmError(
                f"the checkpoint was trained with tokenizer {model_fingerprint}, not "
                f"{tokenizer.fingerprint()}; pass the tokenizer folder it was trained with"
            )
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        # A draft (a smaller model with the same codes) makes greedy answers no different, only
        # faster: speculative decoding (`Generator`). So does a compiled decoding step.
        self.generator = Generator(
            model, decode_dtype, draft, draft_tokens, draft_threshold, compile=compile
        )
        self.size = tokenizer.config.resolution
        self.image_tokens = tokenizer.grid_size**2

    def pixels(self, image: ImageLike) -> np.ndarray:
        """An image as the model sees it: RGB uint8 at the tokenizer's resolution."""
        if isinstance(image, str | Path):
            return load_square(image, self.size)
        if image.shape[:2] != (self.size, self.size):
            raise DelvmError(
                f"image of size {image.shape[1]}x{image.shape[0]}: expected {self.size}x{self.size}"
                " (pass a file path to have it resized and centre-cropped)"
            )
        return image

    def _batches(self, items: Sequence) -> list[Sequence]:
        return [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def encode(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Images -> ids [n, tokens per image]."""
        return torch.cat([
            self.tokenizer.encode(np.stack([self.pixels(i) for i in batch]))
            for batch in self._batches(images)
        ])  # fmt: skip

    def reconstruct(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        """Images through the tokenizer and back: the best any output of the model can look."""
        return self._images(self.encode(images))

    def _images(self, ids: torch.Tensor) -> list[np.ndarray]:
        images = []
        for batch in ids.cpu().split(self.batch_size):
            pixels = self.tokenizer.decode(batch)
            images += list((pixels.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8))
        return images

    def _context_ids(self, examples: Sequence[tuple[ImageLike, ImageLike]]) -> torch.Tensor:
        """The example pairs as one row of ids [1, 2 x pairs x tokens per image]."""
        return self.encode([image for pair in examples for image in pair]).reshape(1, -1)

    def _check_context(self, needed: int) -> None:
        if needed > self.model.config.max_seq_len:
            raise DelvmError(
                f"the prompt needs {needed} tokens but the model's context is "
                f"{self.model.config.max_seq_len}; use fewer example pairs"
            )

    def continue_ids(
        self, prompts: torch.Tensor, new_tokens: int, sampling: SamplingConfig | None
    ) -> torch.Tensor:
        """Continue each row of ``prompts`` [N, T] by ``new_tokens`` codes, ``batch_size`` rows at
        a time; a seeded sampler draws batch i with seed + i, so batches sample independently."""
        self._check_context(prompts.shape[1] + new_tokens)
        sampling = sampling or SamplingConfig()
        out = []
        for i, rows in enumerate(prompts.split(self.batch_size)):
            seed = None if sampling.seed is None else sampling.seed + i
            out.append(self.generator(rows, new_tokens, replace(sampling, seed=seed)))
        return torch.cat(out)

    def __call__(
        self,
        examples: Sequence[tuple[ImageLike, ImageLike]],
        queries: Sequence[ImageLike],
        sampling: SamplingConfig | None = None,
    ) -> list[np.ndarray]:
        """One output image per query, all under the same example pairs."""
        if not queries:
            raise DelvmError("give at least one query image")
        context = self._context_ids(examples)
        query_ids = self.encode(queries)
        prompts = torch.cat([context.expand(len(queries), -1), query_ids], dim=1)
        return self._images(self.continue_ids(prompts, self.image_tokens, sampling))

    @torch.no_grad()
    def answer_nll(
        self,
        examples: Sequence[tuple[ImageLike, ImageLike]],
        queries: Sequence[ImageLike],
        answers: Sequence[ImageLike],
    ) -> list[float]:
        """How strongly the model expects each answer: the mean negative log-likelihood (nats
        per token) of answer i's codes after the example pairs and query i (teacher-forced)."""
        if len(queries) != len(answers) or not queries:
            raise DelvmError(
                f"one answer per query: {len(queries)} queries, {len(answers)} answers"
            )
        context = self._context_ids(examples)
        ids = torch.cat(
            [context.expand(len(queries), -1), self.encode(queries), self.encode(answers)], 1
        )
        self._check_context(ids.shape[1])
        device = self.model.head.weight.device
        nll = []
        for rows in ids.split(self.batch_size):
            rows = rows.to(device)
            # Rows that share the pairs and the query run them once (`prefill`).
            _, logits = prefill(self.model, rows[:, :-1], rows.shape[1] - 1, self.image_tokens)
            logits = logits.float()
            answer = rows[:, -self.image_tokens :]
            loss = F.cross_entropy(logits.transpose(1, 2), answer, reduction="none")
            nll += loss.mean(1).tolist()
        return nll

    def inpaint(
        self, images: Sequence[ImageLike], sampling: SamplingConfig | None = None
    ) -> list[np.ndarray]:
        """Keep the top half of each image's token rows, generate the bottom half."""
        ids = self.encode(images)
        half = self.image_tokens // 2
        rest = self.continue_ids(ids[:, :half], self.image_tokens - half, sampling)
        return self._images(torch.cat([ids[:, :half], rest], dim=1))

    def next_frame(
        self, frames: Sequence[ImageLike], sampling: SamplingConfig | None = None
    ) -> np.ndarray:
        """The frame after ``frames`` (a clip in time order)."""
        ids = self.encode(frames).reshape(1, -1)
        return self._images(self.continue_ids(ids, self.image_tokens, sampling))[0]


def make_grid(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Rows of equal-size images as one image on white (e.g. examples | query | output)."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    canvas = np.full(
        (len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = r * (height + gap), c * (width + gap)
            canvas[y : y + height, x : x + width] = image
    return canvas


def save_grid(rows: list[list[np.ndarray]], path: str | Path, gap: int = 4) -> Path:
    """Write `make_grid(rows, gap)` as a PNG."""
    Image.fromarray(make_grid(rows, gap)).save(path)
    return Path(path)


def load_prompter(
    checkpoint: str | Path,
    tokenizer: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    batch_size: int = 16,
    draft: str | Path | None = None,
    draft_tokens: int = 4,
    compile: bool = False,
    draft_threshold: float = 0.0,
) -> VisualPrompter:
    """A prompter for a checkpoint: a run folder (its latest checkpoint), a delvm checkpoint, or
    a Hugging Face folder such as a `delvm export-hf` export.

    ``tokenizer``: its folder; by default the one the checkpoint names (`checkpoint_tokenizer`).
    ``device`` and ``dtype`` as `delvm.devices` reads ``--device`` / ``--dtype``: ``auto`` runs in
    bf16 on a GPU, in fp32 on a CPU with bf16 copies of the weights decoding; ``int8`` (CPU only)
    decodes with int8 copies instead, faster, answering as slightly changed weights would
    (`delvm.inference.quantize`). ``draft``: a smaller model trained with the same tokenizer
    (e.g. the distilled student) that drafts up to ``draft_tokens`` codes per step of the model,
    fewer where it gave a code less than ``draft_threshold`` probability; the answers stay the
    model's own (speculative decoding). ``compile``: compile the decoding steps (`Generator`;
    CUDA graphs on a GPU), the draft's too.
    """
    from delvm.model.checkpoint import (
        checkpoint_tokenizer,
        load_model,
        resolve_checkpoint,
        tokenizer_fingerprint,
    )
    from delvm.tokenizer import load_tokenizer

    folder, device = resolve_checkpoint(checkpoint), resolve_device(device)
    tokenizer = tokenizer or checkpoint_tokenizer(folder)
    if tokenizer is None:
        raise DelvmError(
            f"{folder}: no tokenizer found beside it or in its run's config; pass --tokenizer DIR"
        )
    # On a CPU, decoding reads every weight once per token: `auto` keeps fp32 weights for the
    # prefill and decodes with bf16 copies of them (half the bytes; see `Generator`), `int8`
    # with int8 copies (`delvm.inference.quantize`).
    decode_dtype = torch.bfloat16 if dtype == "auto" and device.type == "cpu" else None
    if dtype == "int8":
        if device.type != "cpu":
            raise DelvmError(f"--dtype int8 decodes on CPUs, not on {device}: use --dtype auto")
        dtype, decode_dtype = "fp32", torch.int8
    model = load_model(folder, device).to(inference_dtype(dtype, device)).eval()
    tokenizer = load_tokenizer(tokenizer, device)
    draft_model = None
    if draft is not None:
        draft = resolve_checkpoint(draft)
        fingerprint = tokenizer_fingerprint(draft)
        if fingerprint and fingerprint != tokenizer.fingerprint():
            raise DelvmError(
                f"draft {draft} was trained with tokenizer {fingerprint}, not "
                f"{tokenizer.fingerprint()}; a draft must use the model's tokenizer"
            )
        draft_model = load_model(draft, device).to(inference_dtype(dtype, device)).eval()
    return VisualPrompter(
        model,
        tokenizer,
        decode_dtype,
        tokenizer_fingerprint(folder),
        batch_size,
        draft_model,
        draft_tokens,
        compile,
        draft_threshold,
    )


# ---- command line ------------------------------------------------------------------------------


def _prompter(args) -> VisualPrompter:
    batch_size = getattr(args, "batch_size", 1)  # next-frame continues one clip
    # The drafting flags given (their defaults are load_prompter's), which need a draft model.
    drafting = {"draft_tokens": args.draft_tokens, "draft_threshold": args.draft_threshold}
    drafting = {name: value for name, value in drafting.items() if value is not None}
    if args.draft is None and drafting:
        flags = " and ".join("--" + name.replace("_", "-") for name in drafting)
        raise DelvmError(f"{flags} set how a draft model drafts: pass --draft CKPT")
    return load_prompter(
        args.checkpoint, args.tokenizer, args.device, args.dtype, batch_size, args.draft,
        compile=args.compile, **drafting,
    )  # fmt: skip


def _sampling(args) -> SamplingConfig:
    return SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)


def add_checkpoint_arguments(p) -> None:
    """The checkpoint, ``--tokenizer``, ``--device`` and ``--dtype`` of every prompting verb."""
    p.add_argument("checkpoint", type=Path,
                   help="a run folder (its latest checkpoint), checkpoint or Hugging Face folder")  # fmt: skip
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="the tokenizer folder (default: the one the checkpoint names)")  # fmt: skip
    add_device_argument(p)
    add_dtype_argument(p, GENERATING_DTYPES)


def add_compile_argument(p) -> None:
    """``--compile`` of every verb that generates (the prompting verbs, serve, eval-pascal5i)."""
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step (torch.compile; CUDA graphs on a GPU): the "
                   "first batch of each shape compiles, so it pays over many queries; with "
                   "--draft, both models' steps")  # fmt: skip


def _add_common(p) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft", type=Path, default=None, metavar="CKPT",
                   help="a smaller model with the same tokenizer (e.g. the distilled student) "
                   "drafting codes for the model: faster, the same greedy answers")  # fmt: skip
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="codes the draft proposes per step of the model, at most (with --draft; "
                   "default 4)")  # fmt: skip
    p.add_argument("--draft-threshold", type=float, default=None, metavar="P",
                   help="stop drafting a step's codes after one the draft gave less than this "
                   "probability (with --draft; 0: always draft K)")  # fmt: skip
    add_compile_argument(p)


def _add_batch_size(p) -> None:
    p.add_argument("--batch-size", type=int, default=16,
                   help="images generated at once (bounds memory; greedy outputs do not change)")  # fmt: skip


def _run_prompt(args) -> None:
    if len(args.examples) % 2:
        raise DelvmError("--examples takes pairs: IN OUT [IN OUT ...]")
    pairs = list(zip(args.examples[::2], args.examples[1::2], strict=True))
    prompter = _prompter(args)
    outputs = prompter(pairs, args.query, _sampling(args))
    args.out.mkdir(parents=True, exist_ok=True)
    shown = [prompter.pixels(image) for pair in pairs for image in pair]
    rows = []
    for query, output in zip(args.query, outputs, strict=True):
        Image.fromarray(output).save(args.out / f"{Path(query).stem}_output.png")
        rows.append([*shown, prompter.pixels(query), output])
    print(save_grid(rows, args.out / "grid.png"))


def _run_inpaint(args) -> None:
    prompter = _prompter(args)
    outputs = prompter.inpaint(args.images, _sampling(args))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, output in zip(args.images, outputs, strict=True):
        Image.fromarray(output).save(args.out / f"{Path(path).stem}_inpainted.png")
        rows.append([prompter.pixels(path), output])
    print(save_grid(rows, args.out / "grid.png"))


def _run_next_frame(args) -> None:
    prompter = _prompter(args)
    frame = prompter.next_frame(args.frames, _sampling(args))
    args.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(args.out / "next_frame.png")
    print(save_grid([[*(prompter.pixels(f) for f in args.frames), frame]], args.out / "grid.png"))


def add_commands(sub) -> None:
    p = sub.add_parser("prompt", help="generate answer images from example pairs and queries")
    _add_common(p)
    p.add_argument("--examples", nargs="+", required=True, metavar="IMG",
                   help="example pairs: IN OUT [IN OUT ...]")  # fmt: skip
    p.add_argument("--query", nargs="+", required=True, metavar="IMG", help="query images")
    _add_batch_size(p)
    p.set_defaults(func=_run_prompt)

    p = sub.add_parser("inpaint", help="keep the top half of images, generate the bottom half")
    _add_common(p)
    p.add_argument("images", nargs="+", type=Path)
    _add_batch_size(p)
    p.set_defaults(func=_run_inpaint)

    p = sub.add_parser("next-frame", help="predict the frame after a clip of frames")
    _add_common(p)
    p.add_argument("frames", nargs="+", type=Path, help="frames in time order")
    p.set_defaults(func=_run_next_frame)
