"""Task scores of a prompted model on held-out examples, next to trivial baselines.

Each scorer takes `predict(pairs, queries) -> outputs` (a `VisualPrompter` call, or any function
with that shape, e.g. an oracle in tests) and examples at the tokenizer's resolution
(`delvm.data.augment.resize_example`). Support pairs are drawn from the other examples of the
same task (for segmentation: of the query's class), seeded. `prompt_dependence` generates nothing:
it takes `answer_nll(pairs, queries, answers)` (`VisualPrompter.answer_nll`) instead.

``queries_per_prompt`` (default 1: each query draws its own supports) lets that many queries, in
order, share one draw, drawn from the examples outside the group: a prompter then encodes and
prefills the pairs once for the group (`delvm.inference.generate.prefill`) and answers the
group as one batch. The draws differ from one query per prompt, so scores do too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from delvm.data.example import Example
from delvm.data.render import decode_skeleton
from delvm.errors import DelvmError
from delvm.evaluation.scores import (
    FOREGROUND_THRESHOLD,
    FoldIoU,
    coco_keypoint_ap,
    foreground_mask,
    pck,
    psnr_ssim,
    query_iou,
    recognised,
)

Pair = tuple[np.ndarray, np.ndarray]
Predict = Callable[[Sequence[Pair], Sequence[np.ndarray]], list[np.ndarray]]
# answer_nll(pairs, queries, answers) -> nats per token of each answer (`VisualPrompter.answer_nll`)
AnswerNLL = Callable[[Sequence[Pair], Sequence[np.ndarray], Sequence[np.ndarray]], list[float]]


def _supports(
    examples: Sequence[Example], group: Sequence[int], shots: int, rng: np.random.Generator
) -> list[Pair]:
    """Support pairs for the queries ``group`` (indices), drawn from the other examples."""
    others = [i for i in range(len(examples)) if i not in group]
    chosen = rng.choice(others, size=min(shots, len(others)), replace=False)
    return [(examples[i].images[0], examples[i].images[1]) for i in chosen]


def _groups(queries: int, per_prompt: int, examples: int, shots: int) -> list[list[int]]:
    """Queries 0..queries-1 in order, ``per_prompt`` at a time (fewer where a group would leave
    fewer than ``shots`` of the ``examples`` to draw supports from)."""
    if per_prompt < 1:
        raise DelvmError(f"queries_per_prompt must be >= 1, got {per_prompt}")
    size = max(1, min(per_prompt, examples - shots))
    return [list(range(i, min(i + size, queries))) for i in range(0, queries, size)]


def _answers(
    predict: Predict, examples: Sequence[Example], shots: int, per_prompt: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:  # fmt: skip
    """Every example's input answered, in order, under supports from the other examples."""
    outputs = []
    for group in _groups(len(examples), per_prompt, len(examples), shots):
        supports = _supports(examples, group, shots, rng)
        outputs += predict(supports, [examples[i].images[0] for i in group])
    return outputs


def foreground_miou(
    predict: Predict, examples: Sequence[Example], shots: int = 3,
    threshold: float = FOREGROUND_THRESHOLD, seed: int = 0, queries_per_prompt: int = 1,
) -> dict:  # fmt: skip
    """Pascal-5i protocol: supports of the query's class; the output thresholded to a mask.

    Two mIoUs, as the literature uses both: ``query_miou``, the IoU of each query averaged over
    the queries (Bar et al., Visual Prompting); ``miou``, intersections and unions summed per
    class, averaged over the classes (OSLSM / HSNet; `FoldIoU`). Each comes with two baselines':
    all black (IoU 0 wherever truth exists) and all foreground (IoU = the objects' share of the
    image), which any blotchy output can beat black with.
    """
    by_class: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_class[example.meta.get("class", example.task)].append(example)
    rng = np.random.default_rng(seed)
    model, black, white = FoldIoU(), FoldIoU(), FoldIoU()
    per_query: dict[str, list[float]] = {"model": [], "black": [], "white": []}
    names = sorted(by_class)
    for class_index, name in enumerate(names):
        group = by_class[name]
        outputs = _answers(predict, group, shots, queries_per_prompt, rng)
        for query, output in zip(group, outputs, strict=True):
            truth = query.images[1].max(axis=2) > 127  # white, or any instance colour
            for kind, fold, mask in (
                ("model", model, foreground_mask(output, threshold)),
                ("black", black, np.zeros_like(truth)),
                ("white", white, np.ones_like(truth)),
            ):
                fold.add(class_index, mask, truth)
                per_query[kind].append(query_iou(mask, truth))
    per_class = {names[c]: v for c, v in model.per_class().items()}
    return {
        "query_miou": float(np.mean(per_query["model"])),
        "miou": model.miou(),
        "per_class": per_class,
        "queries": len(per_query["model"]),
        "baseline_black_query_miou": float(np.mean(per_query["black"])),
        "baseline_foreground_query_miou": float(np.mean(per_query["white"])),
        "baseline_black_miou": black.miou(),
        "baseline_foreground_miou": white.miou(),
    }


def pose_scores(
    predict: Predict, examples: Sequence[Example], shots: int = 3, seed: int = 0,
    queries_per_prompt: int = 1,
) -> dict:  # fmt: skip
    """Keypoints decoded from generated skeleton maps: PCK@0.2 and COCO AP (one person each)."""
    outputs = _answers(predict, examples, shots, queries_per_prompt, np.random.default_rng(seed))
    predicted = np.stack([decode_skeleton(output) for output in outputs])
    truth = np.stack([query.keypoints[0] for query in examples])
    size = examples[0].images[0].shape[:2]
    black = np.zeros_like(truth)  # an all-black map decodes to no joints at all
    return {
        "pck@0.2": pck(predicted, truth),
        "coco_ap": coco_keypoint_ap(predicted, truth, size),
        "baseline_black_pck@0.2": pck(black, truth),
        "baseline_black_coco_ap": coco_keypoint_ap(black, truth, size),
    }


def derain_scores(
    predict: Predict, examples: Sequence[Example], shots: int = 3, seed: int = 0,
    queries_per_prompt: int = 1,
) -> dict:  # fmt: skip
    """PSNR / SSIM of outputs against clean images; baseline: the rainy input unchanged."""
    outputs = _answers(predict, examples, shots, queries_per_prompt, np.random.default_rng(seed))
    clean = [e.images[1] for e in examples]
    model = psnr_ssim(outputs, clean)
    baseline = psnr_ssim([e.images[0] for e in examples], clean)
    return {
        **model,
        "baseline_input_psnr": baseline["psnr"],
        "baseline_input_ssim": baseline["ssim"],
    }


def _recognition_tasks(tasks: dict[str, Sequence[Example]], queries: int) -> list[str]:
    """The task names of a recognition set, checked: example q of every task shares its input."""
    names = sorted(tasks)
    for q in range(queries):
        first = tasks[names[0]][q].images[0]
        if any(not np.array_equal(tasks[n][q].images[0], first) for n in names[1:]):
            raise DelvmError(
                f"task recognition: example {q} has different inputs across tasks; it needs one "
                "query image with a ground truth for every task"
            )
    return names


def task_recognition(
    predict: Predict, tasks: dict[str, Sequence[Example]], queries: int, shots: int = 3,
    seed: int = 0, queries_per_prompt: int = 1,
) -> dict:  # fmt: skip
    """The paper's Figure 8 claim, measured: each query under every task's prompt; an output
    counts when it is nearest to the prompted task's truth for that query.

    ``tasks`` is a recognition set: example q of every task has the same input image (one query
    with a ground truth per task); the other examples serve as supports.
    """
    rng = np.random.default_rng(seed)
    names = _recognition_tasks(tasks, queries)
    hits = total = 0
    per_task = {name: 0 for name in names}
    fewest = min(len(tasks[name]) for name in names)
    for group in _groups(queries, queries_per_prompt, fewest, shots):
        group_queries = [tasks[names[0]][q].images[0] for q in group]
        outputs = {
            name: predict(_supports(tasks[name], group, shots, rng), group_queries)
            for name in names
        }
        for j, q in enumerate(group):
            truths = {name: tasks[name][q].images[1] for name in names}
            answers = {name: outputs[name][j] for name in names}
            for name, ok in recognised(answers, truths).items():
                per_task[name] += ok
                hits += ok
                total += 1
    return {"accuracy": hits / total, "per_task": {n: per_task[n] / queries for n in names}}


def prompt_dependence(
    answer_nll: AnswerNLL, tasks: dict[str, Sequence[Example]], queries: int, shots: int = 3,
    seed: int = 0, queries_per_prompt: int = 1,
) -> dict:  # fmt: skip
    """Does the prompt change what the model expects? On a recognition set, every task's truth
    for a query is scored (teacher-forced nats per token) under every task's prompt; a truth
    counts when its own task's prompt makes it strictly the most likely.

    Unlike `task_recognition` no image is generated: it shows whether a model reads the prompt
    at all, even when its outputs are too poor to be told apart by their pixels. ``nll`` is the
    mean over queries, [prompted task][truth's task]; equal values down a column mean the prompt
    is ignored for that truth. The supports are those `task_recognition` draws for the same seed.
    """
    rng = np.random.default_rng(seed)
    names = _recognition_tasks(tasks, queries)
    nll = {prompt: dict.fromkeys(names, 0.0) for prompt in names}
    per_task = dict.fromkeys(names, 0)
    fewest = min(len(tasks[name]) for name in names)
    for group in _groups(queries, queries_per_prompt, fewest, shots):
        # Every truth of every query in the group, each after its query: one call per prompt.
        rows = [(q, truth) for q in group for truth in names]
        group_queries = [tasks[names[0]][q].images[0] for q, _ in rows]
        truths = [tasks[truth][q].images[1] for q, truth in rows]
        scored = {
            prompt: answer_nll(_supports(tasks[prompt], group, shots, rng), group_queries, truths)
            for prompt in names
        }
        for row, (_, truth) in enumerate(rows):
            others = [scored[prompt][row] for prompt in names if prompt != truth]
            per_task[truth] += all(scored[truth][row] < value for value in others)
            for prompt in names:
                nll[prompt][truth] += scored[prompt][row] / queries
    return {
        "accuracy": sum(per_task.values()) / (queries * len(names)),
        "per_task": {name: per_task[name] / queries for name in names},
        "nll": nll,
    }
