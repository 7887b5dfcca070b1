"""The demo's reports, from the stages' files: a one-page HTML report (scores next to baselines,
curves and prompt grids, inline) and OUT/results.md, the same scores as Markdown with the command,
date and hardware that measured them (what `delvm results` puts on the docs' results page).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from delvm.evaluation.evaluate import markdown_table
from delvm.evaluation.metrics import SCOPES
from delvm.fileio import atomic_write, read_json

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.yes { color: #070; font-weight: bold; } .no { color: #a00; font-weight: bold; }
img.grid { image-rendering: pixelated; width: 100%; }
"""


def task_rows(scores: dict) -> list[tuple[str, str, float, str, float, bool, float]]:
    """(task, metric, model, baseline name, baseline, model beats baseline, tokenizer ceiling)
    per headline score; the ceiling is the truth through the tokenizer (nan if not measured)."""
    rows = [
        ("segmentation", "mIoU", "miou", "all black", "baseline_black_miou"),
        ("segmentation", "mIoU", "miou", "all foreground", "baseline_foreground_miou"),
        ("pose", "PCK@0.2", "pck@0.2", "all black", "baseline_black_pck@0.2"),
        ("pose", "COCO AP", "coco_ap", "all black", "baseline_black_coco_ap"),
        ("derain", "PSNR (dB)", "psnr", "rainy input", "baseline_input_psnr"),
        ("derain", "SSIM", "ssim", "rainy input", "baseline_input_ssim"),
    ]
    ceiling = scores.get("ceiling", {})
    result = []
    for task, metric, key, name, baseline_key in rows:
        model, baseline = scores[task][key], scores[task][baseline_key]
        limit = ceiling.get(task, {}).get(key, float("nan"))
        result.append((task, metric, model, name, baseline, model > baseline, limit))
    return result


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(figure_or_path) -> str:
    if isinstance(figure_or_path, Path):
        data = figure_or_path.read_bytes()
    else:
        buffer = io.BytesIO()
        figure_or_path.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def curves(tokenizer_log: Path, lvm_log: Path):
    """Tokenizer reconstruction loss + held-out PSNR; LVM training loss + per-task val loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    tok = _records(tokenizer_log)
    steps = [r["step"] for r in tok if "rec" in r]
    left.plot(steps, [r["rec"] for r in tok if "rec" in r], label="reconstruction loss (L1)")
    left.set_xlabel("tokenizer step")
    left.set_title("tokenizer")
    val = [r["val"] for r in tok if "val" in r and "psnr" in r["val"]]
    if val:
        psnr_axis = left.twinx()
        psnr_axis.plot([v["step"] for v in val], [v["psnr"] for v in val], "o-", color="C3")
        psnr_axis.set_ylabel("held-out PSNR (dB)", color="C3")
    left.legend(loc="upper right")

    lvm = _records(lvm_log)
    train = [r for r in lvm if "loss" in r and "val" not in r]
    right.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", alpha=0.7)
    evals = [r for r in lvm if "val" in r]
    for task in sorted(evals[-1]["val"]) if evals else []:
        right.plot(
            [r["step"] for r in evals],
            [r["val"][task]["target"]["loss"] for r in evals],
            "o-",
            label=f"val {task} (target image)",
        )
    right.set_xlabel("LVM step")
    right.set_title("visual language model: next-token loss")
    right.legend()
    figure.tight_layout()
    return figure


def write_report(out: Path, world: dict, timings: dict[str, str]) -> Path:
    """Write OUT/report.html from the stages' files under OUT (world: the toy world's settings)."""
    scores = read_json(out / "scores.json")
    tokenizer = read_json(out / "tokenizer" / "report.json")

    rows = [
        [task, metric, f"{model:.3f}", name, f"{baseline:.3f}",
         f'<span class="{"yes" if beats else "no"}">{"yes" if beats else "no"}</span>',
         f"{limit:.3f}"]
        for task, metric, model, name, baseline, beats, limit in task_rows(scores)
    ]  # fmt: skip
    scores_table = _table(
        ["task", "metric", "model", "baseline", "baseline score", "beats", "tokenizer ceiling"],
        rows,
    )
    recognition = scores["recognition"]
    recognition_table = _table(
        ["prompted task", "outputs nearest that task's truth"],
        [[t, f"{100 * v:.1f} %"] for t, v in recognition["per_task"].items()]
        + [["all", f"<b>{100 * recognition['accuracy']:.1f} %</b>"]],
    )
    dependence = scores["prompt_dependence"]
    truths = list(dependence["per_task"])
    dependence_table = _table(
        ["prompt (row) / truth (column)", *truths],
        [[prompt, *(f"{nll[t]:.3f}" for t in truths)] for prompt, nll in dependence["nll"].items()]
        + [["most likely under its own prompt",
            *(f"{100 * dependence['per_task'][t]:.1f} %" for t in truths)]],
    )  # fmt: skip
    validation_rows = []
    for task, metrics in sorted(scores["validation"].items()):
        cells = [task]
        for scope in SCOPES:
            m = metrics[scope]
            cells += [f"{m['loss']:.3f}", f"{m['accuracy']:.1f}", f"{m['perplexity']:.1f}"]
        validation_rows.append(cells)
    validation_table = _table(
        ["task"] + [f"{n} ({s})" for s in SCOPES for n in ("loss", "acc %", "ppl")],
        validation_rows,
    )
    timing_table = _table(["stage", "this run"], [[k, v] for k, v in timings.items()])
    final = tokenizer.get("final", {})
    figure = curves(out / "tokenizer" / "log.jsonl", out / "lvm" / "log.jsonl")
    grids = "".join(
        f"<h3>{name}</h3><img class='grid' src='{_png(path)}'>"
        for name, path in (
            (
                f"{t}: {scores['shots']} example pair(s) | query | output | truth",
                out / "grids" / f"{t}.png",
            )
            for t in ("segmentation", "pose", "derain")
        )
    )
    recognition_grid = _png(out / "grids" / "recognition.png")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>delvm demo</title>
<style>{STYLE}</style></head><body>
<h1>delvm demo: a visual language model trained on the toy world</h1>
<p>The toy world's three tasks (segmentation, pose, deraining; {html.escape(json.dumps(world))}),
a VQGAN tokenizer trained from scratch (held-out PSNR {final.get("psnr", float("nan")):.2f} dB,
{final.get("used_codes", 0)} codes used, {tokenizer["steps"]} steps in {tokenizer["train_seconds"]:.0f} s),
a balanced token store, and an LVM trained on visual sentences, prompted with
{scores["shots"]} example pair(s) per query and decoded greedily (the most likely code at each
step). Held-out queries come from a toy world of another seed.</p>
<h2>Task scores against trivial baselines</h2>
<p>The tokenizer ceiling is each query's own truth encoded and decoded by the tokenizer: what an
LVM that predicts every code right would score.</p>{scores_table}
<h2>Task recognition</h2>
<p>The same mixed-scene query (shapes, a figure and rain) under each task's prompt; an output counts
when it is nearest (MSE) to the prompted task's truth. Chance is 33 %.</p>{recognition_table}
<p>Query | output under the segmentation, pose and derain prompts:</p>
<img class='grid' src='{recognition_grid}'>
<p>Does the prompt change what the model expects? Each truth of the same queries, scored under
each task's prompt without generating anything (teacher-forced, nats per token, lower is more
likely). A model that reads the prompt is lowest on the diagonal; a column of equal values means
the prompt is ignored for that task. Overall
{100 * dependence["accuracy"]:.1f} % of truths are most likely under their own prompt.</p>
{dependence_table}
<h2>Prompt &rarr; output</h2>{grids}
<h2>Validation (held-out sentences)</h2>{validation_table}
<h2>Curves</h2><img src='{_png(figure)}' style='width:100%'>
<h2>Time</h2>{timing_table}
</body></html>
"""
    path = out / "report.html"
    atomic_write(path, lambda tmp: tmp.write_text(page))
    return path


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_results(out: Path, command: str, stages: dict[str, dict]) -> Path:
    """Write OUT/results.md from scores.json, demo_config.json and ``stages`` (per stage that ran:
    seconds, finished (ISO date), hardware; as `delvm demo` records them in timings.json)."""
    scores = read_json(out / "scores.json")
    settings = read_json(out / "demo_config.json")
    tokenizer = read_json(out / "tokenizer" / "report.json")
    world, train = settings["world"], settings["train"]
    model = train.get("model", {})
    psnr = tokenizer.get("final", {}).get("psnr", float("nan"))

    hardware = sorted({stage["hardware"] for stage in stages.values()})
    if not hardware:
        machine = "not recorded"
    elif len(hardware) == 1:
        machine = hardware[0]
    else:  # a folder resumed on another machine: each stage names its own below
        machine = "each stage's, in the time table below"
    finished = stages.get("scores", {}).get("finished", "(time not recorded)")

    score_rows = [
        [task, metric, f"{value:.3f}", name, f"{baseline:.3f}", "yes" if beats else "no",
         f"{limit:.3f}"]
        for task, metric, value, name, baseline, beats, limit in task_rows(scores)
    ]  # fmt: skip
    recognition, dependence = scores["recognition"], scores["prompt_dependence"]
    recognition_rows = [[t, f"{100 * v:.1f} %"] for t, v in recognition["per_task"].items()]
    recognition_rows.append(["all", f"{100 * recognition['accuracy']:.1f} %"])
    truths = list(dependence["per_task"])
    dependence_rows = [
        [prompt, *(f"{nll[t]:.3f}" for t in truths)] for prompt, nll in dependence["nll"].items()
    ]
    dependence_rows.append(
        ["most likely under its own prompt"]
        + [f"{100 * dependence['per_task'][t]:.1f} %" for t in truths]
    )
    several = len(hardware) > 1
    time_rows = [
        [name, f"{stage['seconds']:.0f}", stage["finished"]] + [stage["hardware"]] * several
        for name, stage in stages.items()
    ]
    total = sum(stage["seconds"] for stage in stages.values())

    text = f"""# The demo: `{command}`

- Measured by `{command}`; scores finished {finished}.
- Hardware: {machine}.
- Settings (`{out / "demo_config.json"}`): world segmentation {world.get("segmentation")} : pose
  {world.get("pose")} : derain {world.get("derain")} (seed {world.get("seed")}); tokenizer
  {tokenizer["steps"]} steps, held-out PSNR {psnr:.2f} dB; LVM `{model.get("preset", "")}` with
  {model.get("overrides", {})}, {train.get("steps")} steps, precision {train.get("precision")}.
- Queries: from a held-out toy world of another seed, {scores["shots"]} example pair(s) per
  prompt, greedy decoding.

## Task scores against trivial baselines

The tokenizer ceiling is each query's own truth encoded and decoded: what an LVM that predicts
every code right would score.

{_markdown(["task", "metric", "model", "baseline", "baseline score", "beats it", "ceiling"],
           score_rows)}

## Task recognition (mixed scenes)

Each mixed scene under every task's prompt; an output counts when it is nearest (MSE) the prompted
task's truth. Chance is {100 / len(recognition["per_task"]):.1f} %.

{_markdown(["prompted task", "outputs nearest its truth"], recognition_rows)}

## Prompt dependence

Each truth of the same scenes scored under each task's prompt (teacher-forced, nats per token,
lower is more likely); a model that reads the prompt is lowest on the diagonal.
{100 * dependence["accuracy"]:.1f} % of truths are most likely under their own prompt.

{_markdown(["prompt (row) / truth (column)", *truths], dependence_rows)}

## Validation (held-out sentences)

{markdown_table(scores["validation"])}

## Time

Each stage's wall-clock time when it ran (a stage resumed after a kill: its last part).

{_markdown(["stage", "seconds", "finished"] + ["hardware"] * several, time_rows)}

All stages listed: {total:.0f} s.
"""  # fmt: skip
    path = out / "results.md"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
