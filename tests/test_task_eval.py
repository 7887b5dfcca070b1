"""Task scores through prompting: oracle and trivial predictors bound them; a tiny Pascal-5i
layout runs end to end through the real source and prompter."""

import numpy as np
import pytest
from PIL import Image

from delvm.data.augment import resize_example
from delvm.data.example import Example
from delvm.data.render import render_skeleton
from delvm.data.sources.pascal import iter_pascal5i
from delvm.data.toyworld import ToyWorldConfig, iter_toyworld
from delvm.errors import DelvmError
from delvm.evaluation.task_scores import (
    derain_scores,
    foreground_miou,
    pose_scores,
    prompt_dependence,
    task_recognition,
)
from delvm.inference.prompting import VisualPrompter
from delvm.model.transformer import VisualLM, preset
from tests.support.tiny import untrained_cpu_tokenizer


def oracle(examples):
    """Answers each query with its own ground truth."""
    truth = {e.images[0].tobytes(): e.images[1] for e in examples}
    return lambda pairs, queries: [truth[q.tobytes()] for q in queries]


def black(pairs, queries):
    return [np.zeros_like(q) for q in queries]


def toy(task, count=6):
    config = ToyWorldConfig(resolution=64, segmentation=count, pose=count, derain=count)
    return [e for e in iter_toyworld(config) if e.task == task][:count]


def test_pose_scores_bound_by_oracle_and_black():
    examples = toy("pose")
    best = pose_scores(oracle(examples), examples, shots=2)
    # Face joints decode a few pixels off at 64 px, and OKS is strict there.
    assert best["pck@0.2"] == 1.0 and best["coco_ap"] > 0.7
    worst = pose_scores(black, examples, shots=2)
    assert worst["pck@0.2"] == 0.0 == best["baseline_black_pck@0.2"]


def test_skeleton_map_decodes_back_to_its_keypoints():
    examples = toy("pose")
    for e in examples:
        rendered = render_skeleton(e.keypoints[:1], 64, 64)
        assert pose_scores(lambda p, q, r=rendered: [r], [e, e], shots=1)["pck@0.2"] == 1.0


def test_derain_scores_against_the_input_baseline():
    examples = toy("derain")
    best = derain_scores(oracle(examples), examples, shots=2)
    assert best["psnr"] == float("inf") or best["psnr"] > 60
    assert best["ssim"] == pytest.approx(1.0, abs=1e-4)
    echo = derain_scores(lambda p, q: list(q), examples, shots=2)
    assert echo["psnr"] == pytest.approx(echo["baseline_input_psnr"])


def write_voc(root, count=4, size=48):
    """A Pascal VOC layout with classes 1 and 2 (fold 0) drawn as rectangles."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        labels = np.zeros((size, size), np.uint8)
        labels[5 + i : 25 + i, 5:30] = 1 + i % 2
        photo = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        photo[labels > 0] += 150
        Image.fromarray(photo).save(root / "JPEGImages" / f"im{i}.jpg", quality=95)
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
        mask.save(root / "SegmentationClass" / f"im{i}.png")
        names.append(f"im{i}")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(names) + "\n")


def test_foreground_miou_on_a_pascal5i_layout(tmp_path):
    write_voc(tmp_path / "voc")
    examples = [resize_example(e, 32) for e in iter_pascal5i(tmp_path / "voc", fold=0, split="val")]
    assert {e.meta["class"] for e in examples} == {"aeroplane", "bicycle"}
    assert foreground_miou(oracle(examples), examples, shots=1)["miou"] == 1.0
    assert foreground_miou(black, examples, shots=1)["miou"] == 0.0
    # All foreground scores each class's object share of its images.
    white = foreground_miou(lambda p, q: [np.full_like(x, 255) for x in q], examples, shots=1)
    for name, iou in white["per_class"].items():
        truths = [e.images[1].max(axis=2) > 127 for e in examples if e.meta["class"] == name]
        assert iou == pytest.approx(sum(t.sum() for t in truths) / sum(t.size for t in truths))
    assert white["miou"] == pytest.approx(white["baseline_foreground_miou"])

    # The real path: a (random, untrained) model prompted with same-class supports.
    tokenizer = untrained_cpu_tokenizer(resolution=32, num_embeddings=64)
    model = VisualLM(preset("tiny", vocab_size=64, codebook_dim=32), tokenizer.codebook.detach())
    scores = foreground_miou(VisualPrompter(model, tokenizer), examples, shots=1)
    assert 0.0 <= scores["miou"] <= 1.0 and set(scores["per_class"]) == {"aeroplane", "bicycle"}


def test_foreground_miou_reads_instance_colours_as_foreground():
    examples = toy("segmentation")
    assert foreground_miou(oracle(examples), examples, shots=2, threshold=0.05)["miou"] == 1.0


def dark_and_bright(queries: int = 3) -> dict[str, list[Example]]:
    """A recognition set: random queries, each with an all-black and an all-white truth."""
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(queries)]
    return {
        "dark": [Example("dark", [x, np.zeros_like(x)], "d") for x in inputs],
        "bright": [Example("bright", [x, np.full_like(x, 255)], "b") for x in inputs],
    }


def test_task_recognition_counts_outputs_nearest_the_prompted_truth():
    tasks = dark_and_bright()

    def follows(pairs, queries):
        return [pairs[0][1] for _ in queries]  # copies the prompt's output style

    assert task_recognition(follows, tasks, queries=3, shots=1)["accuracy"] == 1.0
    assert task_recognition(black, tasks, queries=3, shots=1)["accuracy"] == 0.5
    other = tasks["dark"][1].images[0]
    tasks["bright"][0] = Example("bright", [other, other], "x")
    with pytest.raises(DelvmError, match="different inputs"):
        task_recognition(follows, tasks, queries=3, shots=1)


def test_prompt_dependence_counts_truths_most_likely_under_their_own_prompt():
    tasks = dark_and_bright()

    def reads_the_prompt(pairs, queries, answers):
        # Expects answers as bright as the prompt's output: off by 1 nat per 255 levels.
        style = pairs[0][1].mean()
        return [abs(float(a.mean()) - style) / 255 + 2.0 for a in answers]

    def ignores_the_prompt(pairs, queries, answers):
        return [float(a.mean()) / 255 for a in answers]

    read = prompt_dependence(reads_the_prompt, tasks, queries=3, shots=1)
    assert read["accuracy"] == 1.0
    assert read["nll"]["dark"] == {"bright": 3.0, "dark": 2.0}
    assert read["nll"]["bright"] == {"bright": 2.0, "dark": 3.0}
    ignored = prompt_dependence(ignores_the_prompt, tasks, queries=3, shots=1)
    assert ignored["accuracy"] == 0.0  # ties do not count
    assert ignored["nll"]["dark"] == ignored["nll"]["bright"]


def test_prompt_dependence_prompts_with_the_supports_task_recognition_draws():
    tasks = dark_and_bright(8)
    recognition, dependence = [], []

    def predict(pairs, queries):
        recognition.append([p[0].tobytes() for p in pairs])
        return [pairs[0][1] for _ in queries]

    def answer_nll(pairs, queries, answers):
        dependence.append([p[0].tobytes() for p in pairs])
        return [0.0 for _ in answers]

    task_recognition(predict, tasks, queries=8, shots=2, seed=3)
    prompt_dependence(answer_nll, tasks, queries=8, shots=2, seed=3)
    assert len(recognition) == 16 and recognition == dependence
    prompt_dependence(answer_nll, tasks, queries=8, shots=2, seed=4)
    assert dependence[16:] != recognition  # another seed, other supports: the check can fail


def test_queries_per_prompt_shares_supports_drawn_outside_the_group():
    examples = toy("derain", count=7)
    calls = []

    def predict(pairs, queries):
        calls.append(([p[0].tobytes() for p in pairs], [q.tobytes() for q in queries]))
        return oracle(examples)(pairs, queries)

    for per_prompt, seed in ((1, 0), (5, 0), (5, 1), (5, 2)):
        calls.clear()
        scores = derain_scores(predict, examples, 2, seed, queries_per_prompt=per_prompt)
        assert scores["ssim"] > 0.99  # every query answered with its own truth, in order
        sizes = [len(queries) for _, queries in calls]
        assert sizes == ([1] * 7 if per_prompt == 1 else [5, 2])  # 5 leave 2 to draw from
        for supports, queries in calls:
            assert len(supports) == 2 and not set(supports) & set(queries)
    # Recognition and prompt dependence group alike and still draw the same supports.
    tasks = dark_and_bright(8)
    recognition, dependence = [], []

    def follows(pairs, queries):
        recognition.append([p[0].tobytes() for p in pairs])
        return [pairs[0][1] for _ in queries]

    def answer_nll(pairs, queries, answers):
        dependence.append([p[0].tobytes() for p in pairs])
        assert len(queries) == len(answers) == 4 * 2  # a group of 4, each with both truths
        return [0.0 for _ in answers]

    result = task_recognition(follows, tasks, queries=8, shots=2, seed=3, queries_per_prompt=4)
    assert result["accuracy"] == 1.0 and len(recognition) == 4
    prompt_dependence(answer_nll, tasks, queries=8, shots=2, seed=3, queries_per_prompt=4)
    assert recognition == dependence
    with pytest.raises(DelvmError, match="queries_per_prompt"):
        derain_scores(predict, examples, shots=2, queries_per_prompt=0)
