"""`delvm eval-pascal5i`: few-shot foreground segmentation on Pascal-5i (the paper's Table 4).

The protocol is Bar et al.'s (Visual Prompting, NeurIPS 2022), which DeLVM follows; where DeLVM
is silent (threshold, supports, query count) this module takes Bar et al.'s choices:

- queries: every (val image, class of the fold present in it), from the VOC val list or one of
  HSNet's fold lists (``fold0.txt`` ... with "NAME__CLASS" lines, the lists Bar et al. use);
- supports: ``shots`` (image, mask) pairs of the query's class drawn from the fold's other
  queries with a seeded generator (Bar et al.: one);
- the greedy answer becomes a mask where its pixels are nearer white than black (a channel-mean
  threshold, 0.5 by default: `delvm.evaluation.scores.FOREGROUND_THRESHOLD`);
- the score: IoU per query, averaged over the fold's queries; the mean over folds last.

The class-wise mIoU of the few-shot segmentation literature (OSLSM, HSNet: intersections and
unions summed per class, averaged over the fold's 5 classes) is reported beside it, labelled.
Images and masks are centre-cropped to a square at the tokenizer's resolution, as every prompt
is, and IoU is measured there. Bar et al. cycle a fold's list to 1000 episodes, so some queries
count twice with other supports; here each query counts once.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from delvm.data.augment import resize_example
from delvm.data.example import Example, Skipped
from delvm.data.sources.pascal import iter_pascal5i
from delvm.devices import GENERATING_DTYPES, add_device_argument, add_dtype_argument
from delvm.errors import DelvmError
from delvm.evaluation.scores import FOREGROUND_THRESHOLD
from delvm.evaluation.task_scores import Predict, foreground_miou
from delvm.fileio import write_json
from delvm.inference.prompting import add_compile_argument, load_prompter

FOLDS = (0, 1, 2, 3)
# What a fold's result reports, in table order: (key, column heading).
COLUMNS = (
    ("query_miou", "mIoU per query (Bar et al.)"),
    ("miou", "mIoU per class (OSLSM)"),
    ("baseline_foreground_query_miou", "all-foreground, per query"),
    ("baseline_foreground_miou", "all-foreground, per class"),
)


def fold_queries(
    voc_root: str | Path, fold: int, size: int, list_file: str | Path | None = None
) -> tuple[list[Example], list[Skipped], Counter]:
    """A fold's queries at ``size`` px, the list entries that could not be read, and the
    queries left out (a count per reason)."""
    queries, skipped, left_out = [], [], Counter()
    for item in iter_pascal5i(voc_root, fold, split="val", list_file=list_file):
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        query = resize_example(item, size)
        if query.images[1].max() > 127:
            queries.append(query)
        else:
            left_out["class outside the centre crop"] += 1
    by_class = Counter(q.meta["class"] for q in queries)
    alone = {name for name, count in by_class.items() if count == 1}
    left_out["only query of its class (no support to draw)"] += len(alone)
    kept = [q for q in queries if q.meta["class"] not in alone]
    return kept, skipped, +left_out  # unary +: the reasons that occurred


def evaluate_pascal5i(
    predict: Predict,
    voc_root: str | Path,
    size: int,
    folds: Sequence[int] = FOLDS,
    shots: int = 1,
    threshold: float = FOREGROUND_THRESHOLD,
    seed: int = 0,
    fold_lists: str | Path | None = None,
) -> dict:
    """Per-fold scores (`foreground_miou`'s, with counts) and their mean over ``folds``.

    ``predict(pairs, queries) -> outputs`` as `VisualPrompter.__call__`; ``fold_lists``: a folder
    of ``fold{i}.txt`` lists (default: the VOC val list, every fold class present).
    """
    if shots < 1:
        raise DelvmError(f"--shots {shots}: at least one support pair per query")
    if not 0 < threshold < 1:
        raise DelvmError(f"--threshold {threshold}: a share of white in (0, 1), e.g. 0.5")
    result: dict = {
        "protocol": {"shots": shots, "threshold": threshold, "seed": seed, "size": size},
        "folds": {},
    }
    for fold in folds:
        list_file = Path(fold_lists) / f"fold{fold}.txt" if fold_lists else None
        queries, skipped, left_out = fold_queries(voc_root, fold, size, list_file)
        for item in skipped:
            print(f"fold {fold}: skipped {item.source}: {item.reason}", file=sys.stderr)
        if not queries:
            raise DelvmError(
                f"{voc_root}: fold {fold} has no usable query (each class needs two images "
                "that show it); check the image list and the masks"
            )
        scores = foreground_miou(predict, queries, shots, threshold, seed)
        result["folds"][str(fold)] = {
            **scores, "skipped": len(skipped), "left_out": dict(left_out),
        }  # fmt: skip
    per_fold = result["folds"].values()
    result["mean"] = {key: float(np.mean([f[key] for f in per_fold])) for key, _ in COLUMNS}
    return result


def markdown_table(result: dict) -> str:
    """One row per fold and one for the mean; both mIoUs and the all-foreground baselines."""
    header = ["fold", "queries", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fold, scores in result["folds"].items():
        cells = [fold, str(scores["queries"]), *(f"{scores[key]:.4f}" for key, _ in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(scores["queries"] for scores in result["folds"].values())
    mean = ["mean", str(total), *(f"{result['mean'][key]:.4f}" for key, _ in COLUMNS)]
    lines.append("| " + " | ".join(mean) + " |")
    p = result["protocol"]
    lines.append(
        f"\n{p['shots']}-shot, supports drawn with seed {p['seed']}, greedy answers, foreground "
        f"where the channel mean > {p['threshold']:g} x white, at {p['size']} px."
    )
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> None:
    prompter = load_prompter(
        args.checkpoint, args.tokenizer, args.device, args.dtype, compile=args.compile
    )
    bar = tqdm(desc="pascal-5i", unit="query")

    def predict(pairs, queries):
        outputs = prompter(pairs, queries)
        bar.update(len(queries))
        return outputs

    with bar:
        result = evaluate_pascal5i(
            predict, args.voc, prompter.size, args.fold, args.shots, args.threshold, args.seed,
            args.fold_lists,
        )  # fmt: skip
    result["checkpoint"] = str(args.checkpoint)
    table = markdown_table(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "pascal5i.json", result)
        (args.out / "pascal5i.md").write_text(table + "\n")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-pascal5i",
        help="few-shot foreground segmentation mIoU on Pascal-5i (Table 4)",
        description=(
            "Score a checkpoint on Pascal-5i under Bar et al.'s protocol: each (val image, fold "
            "class) is a query prompted with seeded support pairs of its class; the greedy "
            "answer is thresholded to a mask; IoU per query is averaged over the fold's queries "
            "(the class-wise mIoU is reported beside it). Prints a table; --out writes "
            "pascal5i.json and pascal5i.md."
        ),
    )
    p.add_argument("checkpoint", type=Path,
                   help="a run folder (its latest checkpoint), a checkpoint or a HF folder")  # fmt: skip
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="the tokenizer folder (default: the one the checkpoint names)")  # fmt: skip
    p.add_argument("--voc", type=Path, required=True,
                   help="VOC root: JPEGImages/, SegmentationClassAug/ or SegmentationClass/, "
                        "ImageSets/Segmentation/val.txt")  # fmt: skip
    p.add_argument("--fold", type=int, nargs="+", choices=FOLDS, default=list(FOLDS),
                   help="folds to score (default: all four, and their mean)")  # fmt: skip
    p.add_argument("--fold-lists", type=Path, default=None,
                   help="folder of HSNet / Bar et al. val lists fold0.txt..fold3.txt "
                        "(NAME__CLASS lines); default: the VOC val list")  # fmt: skip
    p.add_argument("--shots", type=int, default=1,
                   help="support pairs per query (default 1, as Bar et al.)")  # fmt: skip
    p.add_argument("--threshold", type=float, default=FOREGROUND_THRESHOLD,
                   help="an output pixel is foreground when its mean over R, G, B exceeds this "
                        "share of white (default %(default)s: nearer white than black, as Bar "
                        "et al.)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the support draws")
    p.add_argument("--out", type=Path, default=None, help="write pascal5i.json and pascal5i.md")
    add_device_argument(p)
    add_dtype_argument(p, GENERATING_DTYPES)
    add_compile_argument(p)
    p.set_defaults(func=_run)
