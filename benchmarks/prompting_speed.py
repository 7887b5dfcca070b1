"""Prompting at speed, measured side by side in one process (ratios are what carries over).

    python benchmarks/prompting_speed.py prefix               # the shared-prefix cache
    python benchmarks/prompting_speed.py draft --work DIR     # speculative decoding
    python benchmarks/prompting_speed.py pascal --device cuda # a 1,000-query Pascal-5i shape
    python benchmarks/prompting_speed.py compile              # the compiled decoding step
    python benchmarks/prompting_speed.py precision --run DIR  # decoding copies vs task scores

``prefix``: a task evaluation, 24 queries under the same 3 example pairs (256-token images, a
small untrained model and tokenizer: speed does not depend on the weights), answered three ways:
one query per call (as the task scorers call a prompter: the pairs encoded and prefilled every
time), one call with every row prefilled whole, and one call with the pairs prefilled once.
Every way must give the same images.

``pascal``: the shape of a Pascal-5i evaluation (`delvm eval-pascal5i`): 1,000 segmentation
queries, one support pair each (Bar et al.'s protocol) or ``--per-prompt`` queries sharing one,
through the paper's f16 tokenizer and 300m model (untrained): the wall time of the whole
evaluation, and images/s. Meant for a GPU (bf16 weights and cache); on a CPU pass fewer queries.

``draft``: a teacher and a student distilled from it, trained on the toy world in DIR (the
demo's world, tokenizer and store; the first run trains them, later runs reuse them), and that
student fine-tuned on the teacher's own greedy answers (``distill.answers = "teacher"``, a draft
model). Held-out queries of every task are answered greedily at batch 1 by the teacher alone and
with each of the two drafting up to k codes per pass (fewer after a code the draft gave less than
a ``--thresholds`` probability), with the tokens/s of each (and of decoding alone: the time of
the prefills left out), the share of drafts kept, the codes each pass of the teacher yields, and
every code where the output differs from the teacher's own, split into near-ties (the two
codes' logits within bf16 rounding of each other, where a pass over k + 1 codes may round
otherwise than a one-code step) and real differences (expected zero).

``compile``: one support pair and a query (768 codes, the pair shared by the rows of a batch)
continued by 256 codes, at batch 1 and 8, by three decoding steps: today's eager step (the
cache read up to the codes so far), the static-shape step run eagerly (the whole cache, masked)
and the static step compiled (`Generator(compile=True)`: inductor on a CPU, CUDA graphs on a
GPU). Decode tokens/s leave the prefill out (the time of 256 codes minus the time of 1); the
first call of the compiled step, which compiles, is timed apart. Every arm's codes are compared
with the eager step's, and each row's first differing code classified as in ``draft`` (inductor
rounds bf16 otherwise than eager kernels: it keeps fused intermediates in fp32).

``precision``: a trained demo run (``--run``: a `delvm demo` output folder) answers its held-out
task queries, as its scores stage does, decoding in fp32, with the bf16 weight copies
(`load_prompter`'s CPU ``auto``) and with int8 weight copies (``--dtype int8``, rounded weights):
the wall time of each, its task scores, and how many of its codes and answers are fp32's.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from timing import results_file

from delvm.inference.generate import Generator, SamplingConfig
from delvm.inference.prompting import VisualPrompter
from delvm.model.transformer import VisualLM, preset

GREEDY = SamplingConfig(temperature=0)
# --decode-dtype on a CPU: the weight copies decoding reads (fp32: the model's own weights).
DECODE_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8, "fp32": None}


def table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))


def wall(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class Recording:
    """A generator that keeps what it generated: answers are compared as codes (decoding a
    batch rounds a few pixels otherwise than decoding one image)."""

    def __init__(self, generator: Generator):
        self.generator, self.codes = generator, []

    def __call__(self, *args) -> torch.Tensor:
        self.codes.append(self.generator(*args))
        return self.codes[-1]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"


def on_device(model: VisualLM, tokenizer, device: torch.device) -> dict:
    """Move both; the prompter's arguments for the device: on a GPU bf16 weights and cache, on
    a CPU fp32 weights for the prefill and bf16 copies for decoding (as `load_prompter`)."""
    if device.type == "cuda":
        model.to(device, torch.bfloat16)
        tokenizer.to(device)
        return {"decode_dtype": None}
    return {"decode_dtype": torch.bfloat16}


def synced(fn, device: torch.device):
    def run():
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result

    return run


# ---- the shared-prefix cache ---------------------------------------------------------------


def prefix_benchmark(args: argparse.Namespace) -> None:
    from delvm.data.toyworld import ToyWorldConfig, toyworld_example
    from delvm.tokenizer import VQGAN
    from delvm.tokenizer import preset as tokenizer_preset

    torch.manual_seed(0)
    # 128 px through an f8 tokenizer: 16 x 16 = 256 codes per image, as the paper's images.
    tokenizer = VQGAN(tokenizer_preset("cpu-64-f8-1024", resolution=128, norm="group")).eval()
    tokens = tokenizer.grid_size**2
    config = preset(
        "tiny", vocab_size=tokenizer.num_codes, codebook_dim=tokenizer.codebook.shape[1],
        hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_heads=args.hidden // 64,
        num_layers=args.layers, max_seq_len=(2 * args.shots + 2) * tokens,
    )  # fmt: skip
    model = VisualLM(config, codebook=tokenizer.codebook.detach()).eval()
    world = ToyWorldConfig(resolution=128)
    examples = [toyworld_example(world, "derain", i) for i in range(args.shots + args.queries)]
    pairs = [tuple(e.images) for e in examples[: args.shots]]
    queries = [e.images[0] for e in examples[args.shots :]]

    device = torch.device(args.device)
    settings = on_device(model, tokenizer, device)
    # One batch for all queries, so that the prefix is prefilled once.
    prompters = {
        share: VisualPrompter(model, tokenizer, batch_size=args.queries, **settings)
        for share in (False, True)
    }
    for share, prompter in prompters.items():
        generator = Generator(model, settings["decode_dtype"], share_prefix=share)
        prompter(pairs, queries[:2])  # warm-up: allocator, kernels
        prompter.generator = Recording(generator)
    whole, shared = prompters[False], prompters[True]
    ways = {
        "one query per call (the scorers' loop)": lambda: [shared(pairs, [q])[0] for q in queries],
        "one call, every row prefilled whole": lambda: whole(pairs, queries),
        "one call, pairs prefilled once": lambda: shared(pairs, queries),
    }
    times, codes = {}, {}
    for name, run in ways.items():
        shared.generator.codes.clear()
        whole.generator.codes.clear()
        times[name], _ = wall(synced(run, device))
        codes[name] = torch.cat(shared.generator.codes + whole.generator.codes)
    reference = codes["one call, pairs prefilled once"]
    print(
        f"task evaluation: {args.queries} queries under {args.shots} pairs of {tokens}-token "
        f"images, model {args.hidden} x {args.layers} layers, bf16 decode; {machine(device)}"
    )
    rows = []
    for name in ways:
        same = int((codes[name] == reference).all(1).sum())
        slower = times[name] / times["one call, pairs prefilled once"]
        rows.append((name, f"{times[name]:.1f} s", f"{slower:.2f}x", f"{same}/{len(queries)}"))
    table(("way", "wall time", "time vs pairs prefilled once", "same answer codes"), rows)
    before = times["one call, every row prefilled whole"]
    after = times["one call, pairs prefilled once"]
    print(f"shared prefix: {before:.1f} s -> {after:.1f} s, {before / after:.2f}x")


# ---- speculative decoding ------------------------------------------------------------------

TEACHER = {"hidden_size": 512, "intermediate_size": 1376, "num_heads": 8, "num_layers": 6}
STUDENT = {"hidden_size": 192, "intermediate_size": 512, "num_heads": 6, "num_layers": 2}


def train_pair(work: Path, steps: int, tokenizer_steps: int, draft_steps: int):
    """The demo's world, tokenizer and store; a teacher on them; a student distilled from it;
    that student fine-tuned on the teacher's greedy answers for ``draft_steps`` (0: none).
    Returns the demo (its world, tokenizer, teacher) and the drafting models' checkpoints by
    name; trained once, then reused."""
    from delvm.demo.pipeline import Demo, load_demo_config
    from delvm.train.cli import open_sentences
    from delvm.train.config import TrainConfig, build_config
    from delvm.train.trainer import Trainer

    config = load_demo_config(
        "demo",
        [f"out={work / 'teacher'}", f"train.steps={steps}", f"tokenizer.steps={tokenizer_steps}"],
    )
    config.train["model"]["overrides"] = {**TEACHER, "max_seq_len": 256}
    demo = Demo(config)
    demo.check_settings()
    for stage in ("world", "tokenizer", "store", "lvm"):
        getattr(demo, stage)()
    teacher = demo.checkpoint
    values = demo.train_config().to_dict()
    values.update(out=str(work / "student"))
    values["model"]["overrides"] = {**STUDENT, "max_seq_len": 256}
    values["distill"]["teacher"] = str(teacher)
    student_config = build_config(TrainConfig, values, "student")
    student = Path(student_config.out) / "checkpoints" / f"step-{steps:06d}"
    if not student.exists():
        Trainer(student_config, open_sentences(student_config)).run()
    drafters = {"student": student}
    if draft_steps:
        values.update(out=str(work / "draft"), init_from=str(student), steps=draft_steps,
                      micro_batch=16)  # fmt: skip
        values["distill"].update(answers="teacher", w_kd=0.0)  # the teacher's answers, by CE
        values["data"]["answer_noise"] = 0.0  # clean prompts, as it will read them
        values["optim"].update(lr=1e-3, min_lr=1e-4, warmup_ratio=0.02)
        draft_config = build_config(TrainConfig, values, "draft")
        drafters["student on the teacher's answers"] = (
            Path(draft_config.out) / "checkpoints" / f"step-{draft_steps:06d}"
        )
        if not drafters["student on the teacher's answers"].exists():
            Trainer(draft_config, open_sentences(draft_config)).run()
    return demo, drafters


def held_out_prompts(prompter: VisualPrompter, world, per_task: int) -> torch.Tensor:
    """Token prompts [n, T] from a held-out toy world (the demo's, another seed, no mixed
    scenes, as its scores): one example pair, then the query."""
    from delvm.data.toyworld import TASKS, toyworld_example

    world = replace(world, seed=world.seed + 1000, mixed=0.0)
    prompts = []
    for task in TASKS:
        for i in range(per_task):
            support, query = (toyworld_example(world, task, 2 * i + j) for j in (0, 1))
            prompts.append(prompter._context_ids([tuple(support.images)]))
            prompts[-1] = torch.cat([prompts[-1], prompter.encode([query.images[0]])], dim=1)
    return torch.cat(prompts)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    differ = (a != b).nonzero()
    return int(differ[0]) if len(differ) else None


def classify_differences(decoder: VisualLM, prompts, reference, outputs) -> tuple[int, int]:
    """Per differing row, the first differing code: a near-tie if the teacher's (bf16) logits of
    the two codes, recomputed in one pass over the shared context, lie within bf16 rounding."""
    ties = real = 0
    for prompt, ref, out in zip(prompts, reference, outputs, strict=True):
        j = first_difference(ref, out)
        if j is None:
            continue
        with torch.inference_mode():
            logits = decoder(torch.cat([prompt, ref[:j]])[None])[0, -1].float()
        gap = (logits[ref[j]] - logits[out[j]]).abs()
        ties += bool(gap <= 2**-7 * logits.abs().max())  # bf16 keeps 8 significant bits
        real += not bool(gap <= 2**-7 * logits.abs().max())
    return ties, real


def draft_benchmark(args: argparse.Namespace) -> None:
    demo, drafters = train_pair(args.work, args.steps, args.tokenizer_steps, args.draft_steps)
    title = "Speculative decoding: `benchmarks/prompting_speed.py draft`"
    with results_file(args.results, title):
        measure_drafts(args, demo, drafters)


def measure_drafts(args: argparse.Namespace, demo, drafters: dict[str, Path]) -> None:
    from delvm.data.toyworld import ToyWorldConfig
    from delvm.model.checkpoint import load_model
    from delvm.tokenizer import load_tokenizer

    device = torch.device(args.device)
    tokenizer = load_tokenizer(demo.tokenizer_folder, device)
    teacher = load_model(demo.checkpoint, device).eval()
    drafts = {name: load_model(path, device).eval() for name, path in drafters.items()}
    decode_dtype = DECODE_DTYPES[args.decode_dtype]
    if device.type == "cuda":  # bf16 weights and caches, as load_prompter's `auto`
        for model in (teacher, *drafts.values()):
            model.to(torch.bfloat16)
        decode_dtype = None
    prompter = VisualPrompter(teacher, tokenizer)
    prompts = held_out_prompts(prompter, ToyWorldConfig(**demo.config.world), args.per_task)
    new = prompter.image_tokens

    # (compiled, drafting model, draft length, threshold): ("", 0, 0) is the teacher alone.
    drafting = [(n, k, t) for n in drafts for k in args.draft_tokens for t in args.thresholds]
    arms = {
        (compiled, name, k, threshold): Generator(
            teacher, decode_dtype, drafts.get(name), max(k, 1), threshold, compile=compiled
        )
        for compiled in ([False, True] if args.compile else [False])
        for name, k, threshold in [("", 0, 0.0), *drafting]
    }

    def answer(generator: Generator, codes: int) -> torch.Tensor:
        return synced(lambda: torch.cat([generator(p[None], codes, GREEDY) for p in prompts]),
                      device)()  # fmt: skip

    for generator in arms.values():  # warm-up: compiles every shape the answers take
        answer(generator, new)
    # Every arm once per round, best of the rounds: the machine's load drifts between arms. The
    # time of one code (the prefills) is timed apart, so decoding's own speed shows too.
    seconds, first, outputs = {}, {}, {}
    for _ in range(args.repeats):
        for arm, generator in arms.items():
            generator.stats = replace(generator.stats, passes=0, drafted=0, accepted=0)
            took, outputs[arm] = wall(lambda g=generator: answer(g, new))
            seconds[arm] = min(seconds.get(arm, float("inf")), took)
            one_code = wall(lambda g=generator: answer(g, 1))[0]
            first[arm] = min(first.get(arm, float("inf")), one_code)
    speed = {arm: len(prompts) * new / t for arm, t in seconds.items()}
    decoding = {arm: len(prompts) * (new - 1) / (t - first[arm]) for arm, t in seconds.items()}
    alone = False, "", 0, 0.0
    reference = outputs[alone]
    sizes = ", ".join(f"{name} {millions(model)}" for name, model in drafts.items())
    precision = "bf16" if device.type == "cuda" else f"{args.decode_dtype} decode"
    print(
        f"teacher {millions(teacher)} parameters, {sizes}; {len(prompts)} held-out queries, {new} "
        f"codes each, greedy, batch 1, {precision}, best of {args.repeats} rounds; "
        f"{machine(device)}\n"
    )
    for name, model in drafts.items():
        print(f"- the {name}'s first choice is the teacher's code at "
              f"{agreement(model, prompts, reference):.1%} of the teacher's answers' codes")  # fmt: skip
    print(
        f"- the prefills (the prompt's {prompts.shape[1]} codes into each model) take "
        f"{first[alone] / seconds[alone]:.0%} of the teacher alone's time; 'decoding' leaves "
        "them out (the time of all codes minus the time of the first)\n"
    )
    rows = []
    for (compiled, name, k, threshold), generator in arms.items():
        label = (f"teacher + {name} drafting" if k else "teacher alone") + (
            ", compiled steps" if compiled else ""
        )
        arm = compiled, name, k, threshold
        ties, real = classify_differences(arms[alone].decoder, prompts, reference, outputs[arm])
        stats = generator.stats
        rows.append(
            (label, k or "", threshold if k else "", f"{speed[arm]:.1f}",
             f"{speed[arm] / speed[alone]:.2f}x", f"{speed[arm] / speed[compiled, '', 0, 0.0]:.2f}x",
             f"{decoding[arm] / decoding[alone]:.2f}x",
             f"{stats.acceptance:.1%}" if k else "",
             f"{(stats.accepted + stats.passes) / stats.passes:.2f}" if k else "",
             f"{int((outputs[arm] != reference).sum())}", f"{ties} near-tie / {real} real")
        )  # fmt: skip
    table(
        ("decoding", "draft length", "threshold", "tokens/s", "vs eager alone",
         "vs alone, same step", "decoding vs eager alone", "drafts kept", "codes per pass",
         "codes differing", "first differences"),
        rows,
    )  # fmt: skip


def millions(model: VisualLM) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def agreement(draft: VisualLM, prompts: torch.Tensor, answers: torch.Tensor) -> float:
    """The share of the teacher's answer codes that are the draft's argmax, read with the
    teacher's answer so far (teacher forcing): what bounds the drafts kept."""
    with torch.inference_mode():
        logits = draft(torch.cat([prompts, answers[:, :-1]], 1))[:, prompts.shape[1] - 1 :]
    return (logits[..., : draft.config.codes].argmax(-1) == answers).float().mean().item()


# ---- the compiled decoding step ---------------------------------------------------------------


def timed_generation(generator, prompts: torch.Tensor, new: int, device: torch.device):
    """The wall time of ``new`` greedy codes after ``prompts``, and the codes."""
    return wall(synced(lambda: generator(prompts, new, GREEDY), device))


def compile_benchmark(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    new, pair = args.image_tokens, 2 * args.image_tokens
    config = preset(
        "tiny", vocab_size=8192, codebook_dim=64, hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3, num_heads=args.hidden // 64,
        num_layers=args.layers, max_seq_len=4 * new,
    )  # fmt: skip
    model = VisualLM(config).eval()
    decode_dtype = DECODE_DTYPES[args.decode_dtype]
    if device.type == "cuda":  # bf16 weights and cache, as load_prompter's `auto`
        model.to(device, torch.bfloat16)
        decode_dtype = None
    eager = "eager (cache up to the codes so far)"
    arms = {eager: {}, "static, eager": {"static": True}, "static, compiled": {"compile": True}}
    precision = "bf16" if device.type == "cuda" else f"fp32 prefill, {args.decode_dtype} decode"
    print(
        f"{3 * new}-code prompts (a support pair shared by a batch's rows, then a query), "
        f"{new} new codes, greedy, model {args.hidden} x {args.layers} layers, {precision}, "
        f"best of {args.repeats} rounds; {machine(device)}"
    )
    rows = []
    for batch in args.batches:
        torch._dynamo.reset()  # each batch size compiles for its own shapes, as a new process
        generators = {name: Generator(model, decode_dtype, **flags) for name, flags in arms.items()}
        prompts = torch.cat(
            [torch.randint(0, config.codes, (1, pair)).expand(batch, -1),
             torch.randint(0, config.codes, (batch, new))], dim=1,
        ).to(device)  # fmt: skip
        first_call = {
            name: timed_generation(generator, prompts, new, device)[0]
            for name, generator in generators.items()
        }
        # The prefill and first code (the same in every arm), and every arm once per round,
        # best of the rounds: the machine's load drifts between arms.
        prefill, seconds, codes = float("inf"), {}, {}
        for _ in range(args.repeats):
            took, _ = timed_generation(generators[eager], prompts, 1, device)
            prefill = min(prefill, took)
            for name, generator in generators.items():
                took, codes[name] = timed_generation(generator, prompts, new, device)
                seconds[name] = min(seconds.get(name, float("inf")), took)
        decode = {name: seconds[name] - prefill for name in arms}
        decoder = generators[eager].decoder
        for name in arms:
            same = int((codes[name] == codes[eager]).sum())
            ties, real = classify_differences(decoder, prompts, codes[eager], codes[name])
            rows.append(
                (batch, name, f"{batch * new / seconds[name]:.1f}",
                 f"{batch * (new - 1) / decode[name]:.1f}", f"{decode[eager] / decode[name]:.2f}x",
                 f"{first_call[name]:.1f} s", f"{same}/{codes[name].numel()}",
                 f"{ties} near-tie / {real} real")
            )  # fmt: skip
    table(
        ("batch", "decoding step", "tokens/s", "decode tokens/s", "decode vs eager",
         "first call", "codes as eager", "rows' first differences"),
        rows,
    )  # fmt: skip


# ---- a Pascal-5i-shaped evaluation -------------------------------------------------------------


def pascal_benchmark(args: argparse.Namespace) -> None:
    from delvm.data.example import Example
    from delvm.evaluation.task_scores import foreground_miou
    from delvm.tokenizer import VQGAN
    from delvm.tokenizer import preset as tokenizer_preset

    torch.manual_seed(0)
    device = torch.device(args.device)
    tokenizer = VQGAN(tokenizer_preset("f16-8192")).eval()
    config = preset(args.model, vocab_size=tokenizer.num_codes, max_seq_len=4 * 256,
                    codebook_dim=tokenizer.codebook.shape[1])  # fmt: skip
    model = VisualLM(config, tokenizer.codebook.detach()).eval()
    prompter = VisualPrompter(model, tokenizer, batch_size=args.batch_size,
                              **on_device(model, tokenizer, device))  # fmt: skip
    # A fold's 5 classes of random images and masks: what is measured is the time, not the score.
    rng = torch.Generator().manual_seed(0)
    examples = []
    for i in range(args.queries):
        image = torch.randint(0, 256, (256, 256, 3), generator=rng, dtype=torch.uint8).numpy()
        mask = (torch.rand(256, 256, 1, generator=rng) > 0.7).expand(-1, -1, 3)
        examples.append(
            Example("segmentation", [image, mask.numpy().astype("uint8") * 255], f"q{i}",
                    meta={"class": f"class{i % 5}"})
        )  # fmt: skip
    done = 0

    def predict(pairs, queries):
        nonlocal done
        done += len(queries)
        return prompter(pairs, queries)

    rows = []
    for per_prompt in args.per_prompt:
        seconds, result = wall(
            synced(lambda p=per_prompt: foreground_miou(predict, examples, 1, queries_per_prompt=p),
                   device)
        )  # fmt: skip
        rows.append((per_prompt, f"{seconds:.1f} s", f"{args.queries / seconds:.2f}"))
    print(
        f"Pascal-5i shape: {args.queries} queries, 1 support pair, 256-token images, "
        f"{args.model} model, batch size {args.batch_size}; {machine(device)}"
    )
    table(("queries per support pair", "wall time", "queries/s"), rows)


# ---- decoding precision against task scores ----------------------------------------------------


def precision_benchmark(args: argparse.Namespace) -> None:
    from delvm.demo.pipeline import Demo, DemoConfig, ScoreSection
    from delvm.fileio import read_json

    saved = args.run / "demo_config.json"
    if not saved.is_file():
        raise SystemExit(
            f"{args.run}: no demo_config.json; --run takes a `delvm demo` output folder"
        )
    settings = read_json(saved)
    config = DemoConfig(**{**settings, "out": str(args.run),
                           "scores": ScoreSection(**settings["scores"])})  # fmt: skip
    demo = Demo(config)
    if not demo.checkpoint.exists():
        raise SystemExit(f"{demo.checkpoint}: missing; finish the demo's lvm stage first")
    title = "Decoding precision and task scores: `benchmarks/prompting_speed.py precision`"
    with results_file(args.results, title):
        measure_precision(demo)


def measure_precision(demo) -> None:
    from delvm.demo.pipeline import context_shots
    from delvm.inference.prompting import load_prompter

    run = demo.out
    examples = demo.task_examples()
    arms = {"fp32": "fp32", "bf16 copies (CPU auto)": "auto", "int8 copies (--dtype int8)": "int8"}
    seconds, scores, codes = {}, {}, {}
    for name, dtype in arms.items():
        prompter = load_prompter(demo.checkpoint, demo.tokenizer_folder, "cpu", dtype)
        recording = Recording(prompter.generator)
        prompter.generator = recording
        seconds[name], scores[name] = wall(
            lambda p=prompter: demo.score_tasks(p, examples, context_shots(p))
        )
        codes[name] = torch.cat(recording.codes)
    model = prompter.model
    queries = sum(len(pool) for pool in examples.values())
    per_prompt = demo.config.scores.queries_per_prompt
    print(f"{run}: {millions(model)} parameters, {queries} held-out queries of "
          f"{codes['fp32'].shape[1]} codes, greedy, {per_prompt} per prompt (the batch); "
          f"{machine(torch.device('cpu'))}\n")  # fmt: skip
    rows = []
    for name in arms:
        same = codes[name] == codes["fp32"]
        score = scores[name]
        rows.append(
            (name, f"{seconds[name]:.1f}", f"{seconds['fp32'] / seconds[name]:.2f}x",
             f"{score['segmentation']['miou']:.3f}", f"{score['pose']['pck@0.2']:.3f}",
             f"{score['derain']['psnr']:.2f}", f"{same.float().mean():.1%}",
             f"{int(same.all(1).sum())} / {len(same)}")
        )  # fmt: skip
    table(
        ("decoding", "seconds", "vs fp32", "segmentation mIoU", "pose PCK@0.2", "derain PSNR",
         "codes as fp32's", "answers as fp32's"),
        rows,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prefix", help="a task evaluation with and without the shared prefix")
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=prefix_benchmark)
    p = sub.add_parser("pascal", help="the wall time of a Pascal-5i-shaped evaluation")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--per-prompt", type=int, nargs="+", default=[1, 16])
    p.add_argument("--model", default="300m")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda")
    p.set_defaults(func=pascal_benchmark)
    p = sub.add_parser("draft", help="the teacher alone vs with its distilled student drafting")
    p.add_argument("--work", type=Path, required=True, help="folder for the trained pair")
    p.add_argument("--steps", type=int, default=1000, help="training steps of each model")
    p.add_argument("--draft-steps", type=int, default=1000,
                   help="fine-tuning steps of the student on the teacher's answers (0: none)")  # fmt: skip
    p.add_argument("--tokenizer-steps", type=int, default=1000, help="as the demo's")
    p.add_argument("--per-task", type=int, default=4, help="held-out queries per task")
    p.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 3, 4, 6],
                   help="draft lengths (the most codes drafted per pass)")  # fmt: skip
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0],
                   help="draft thresholds (Generator's draft_threshold; 0: always k codes)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="rounds; each arm's best is shown")
    p.add_argument("--decode-dtype", choices=list(DECODE_DTYPES), default="bf16",
                   help="bf16: load_prompter's CPU default (weight copies for decoding); int8: "
                   "its --dtype int8")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="the same arms again with compiled decoding steps")  # fmt: skip
    p.add_argument("--device", default="cpu",
                   help="where the pair answers (cuda: bf16 weights and caches); training "
                        "runs on a GPU when there is one")  # fmt: skip
    p.add_argument("--results", metavar="DIR",
                   help="also write the table to DIR/results.md (for `delvm results`)")  # fmt: skip
    p.set_defaults(func=draft_benchmark)
    p = sub.add_parser("compile", help="eager vs static vs compiled decoding steps")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--image-tokens", type=int, default=256, help="codes per image")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each arm's best is shown")
    p.add_argument("--decode-dtype", choices=list(DECODE_DTYPES), default="bf16",
                   help="on a CPU; bf16: load_prompter's CPU default (weight copies for decoding)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=compile_benchmark)
    p = sub.add_parser("precision", help="a trained demo's task scores by decoding precision")
    p.add_argument("--run", type=Path, required=True, help="a `delvm demo` output folder")
    p.add_argument("--results", metavar="DIR",
                   help="also write the table to DIR/results.md (for `delvm results`)")  # fmt: skip
    p.set_defaults(func=precision_benchmark)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
