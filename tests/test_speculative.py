"""Speculative decoding: greedy output is the model's own, sampled output follows its distribution."""

import copy

import pytest
import torch
from PIL import Image

from delvm.errors import DelvmError
from delvm.inference.generate import Generator, SamplingConfig, accept_drafts, probabilities
from delvm.model.transformer import VisualLM, preset

GREEDY = SamplingConfig(temperature=0)


def tiny_model(seed: int, block: str = "llama", vocab: int = 512, scale: float = 20.0) -> VisualLM:
    torch.manual_seed(seed)
    name = "tiny" if block == "llama" else "tiny-vit"
    model = VisualLM(preset(name, vocab_size=vocab)).eval()
    with torch.no_grad():
        model.head.weight.mul_(scale)  # peaked distributions: no argmax decided by rounding
    return model


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


def drafts(target: VisualLM) -> dict[str, VisualLM]:
    """Drafts from useless to perfect: every kind of pass (none kept, some, all) occurs."""
    wrong = copy.deepcopy(target)
    with torch.no_grad():
        wrong.head.weight.neg_()  # its first guess is the target's least likely code
    noisy = copy.deepcopy(target)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    return {"itself": target, "wrong": wrong, "noisy": noisy, "random": tiny_model(1, "vit")}


@pytest.mark.parametrize("draft_tokens, threshold", [(1, 0.0), (3, 0.0), (8, 0.0), (8, 0.5)])
def test_greedy_output_is_the_models_own(target, draft_tokens, threshold):
    prompt = torch.randint(0, target.config.vocab_size, (3, 30))
    reference = Generator(target)(prompt, 41, GREEDY)
    kept = {}
    for name, draft in drafts(target).items():
        generator = Generator(target, draft=draft, draft_tokens=draft_tokens,
                              draft_threshold=threshold)  # fmt: skip
        assert torch.equal(generator(prompt, 41, GREEDY), reference), name
        for row in range(3):  # batched rows advance together; alone, each keeps its own run
            assert torch.equal(
                generator(prompt[row : row + 1], 41, GREEDY), reference[row : row + 1]
            )
        kept[name] = generator.stats.acceptance
    assert kept["itself"] == 1.0 and kept["wrong"] == 0.0
    assert 0.0 < kept["noisy"] < 1.0


def test_draft_must_share_the_codes_and_fit(target):
    with pytest.raises(DelvmError, match="draft model predicts 64 codes"):
        Generator(target, draft=tiny_model(1, vocab=64))
    with pytest.raises(DelvmError, match="draft_tokens"):
        Generator(target, draft=target, draft_tokens=0)
    with pytest.raises(DelvmError, match="draft_threshold must lie in"):
        Generator(target, draft=target, draft_threshold=1.5)
    short = VisualLM(preset("tiny", max_seq_len=32))
    with pytest.raises(DelvmError, match="draft model's max_seq_len 32"):
        Generator(target, draft=short)(torch.zeros(1, 30, dtype=torch.long), 5)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probabilities (bins expected below 5 are pooled)."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    counts = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    if expected[-1] == 0:
        counts, expected = counts[:-1], expected[:-1]
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(len(counts) - 1.0, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))


def test_accept_rule_draws_from_the_target_distribution():
    """Fixed target and draft distributions over 5 codes, 3 drafts: position 1's code (the first
    kept or the resampled one) follows p_1, and position 2's, where position 1's draft was kept,
    follows p_2 — whatever the draft proposes."""
    torch.manual_seed(0)
    sampling = SamplingConfig(temperature=1.0)
    target = torch.randn(1, 4, 5) * 2
    draft = torch.randn(1, 3, 5) * 2
    p, q = probabilities(target, sampling)[0], probabilities(draft, sampling)[0]
    generator = torch.Generator().manual_seed(1)
    first, second = torch.zeros(5), torch.zeros(5)
    for _ in range(6000):
        drafted = torch.multinomial(q, 1, generator=generator).T  # [1, 3]
        n, following = accept_drafts(target, draft, drafted, sampling, generator)
        codes = torch.cat([drafted[0, :n], following])
        first[codes[0]] += 1
        if n >= 1:
            second[codes[1]] += 1
    assert second.sum() > 1000  # enough passes kept position 1's draft to test position 2
    assert chi_square_p_value(first, p[0]) > 1e-3
    assert chi_square_p_value(second, p[1]) > 1e-3
    # The test can tell: the draft's own distribution is rejected.
    assert chi_square_p_value(first, q[0]) < 1e-6


@pytest.mark.parametrize("draft_name", ["itself", "random"])
def test_sampled_codes_follow_the_target_distribution(draft_name):
    """A model over 6 codes continues one prompt 4000 times at once; the 2nd and 3rd codes (the
    first comes from the prefill) are tested against the exact probabilities, computed by
    running the target on every possible sequence."""
    target = tiny_model(2, vocab=6, scale=3.0)
    draft = target if draft_name == "itself" else tiny_model(3, "vit", vocab=6, scale=3.0)
    sampling = SamplingConfig(temperature=1.0, seed=4)
    prompt = torch.randint(0, 6, (1, 10)).expand(4000, -1)
    generator = Generator(target, draft=draft, draft_tokens=2)
    out = generator(prompt, 3, sampling)
    with torch.no_grad():
        p1 = target(prompt[:1])[0, -1].softmax(-1)  # [6]
        firsts = torch.cat([prompt[:6], torch.arange(6)[:, None]], dim=1)
        p2 = target(firsts)[:, -1].softmax(-1)  # [x1, x2]
        seconds = torch.cat([firsts.repeat_interleave(6, 0), torch.arange(6).repeat(6)[:, None]], 1)
        p3 = target(seconds)[:, -1].softmax(-1).view(6, 6, 6)  # [x1, x2, x3]
    joint12 = p1[:, None] * p2
    marginal3 = (joint12[..., None] * p3).sum((0, 1))
    counts12 = torch.bincount(out[:, 0] * 6 + out[:, 1], minlength=36).float()
    counts3 = torch.bincount(out[:, 2], minlength=6).float()
    assert chi_square_p_value(counts12, joint12.flatten()) > 1e-3
    assert chi_square_p_value(counts3, marginal3) > 1e-3
    if draft_name == "itself":  # codes 2 and 3 from one pass: a kept draft, then p_{k+1}
        assert generator.stats.passes == 1 and generator.stats.accepted == 1
    else:  # code 2 drawn after a rejection, code 3 in a second pass
        assert generator.stats.passes == 2 and generator.stats.accepted == 0


def test_prompter_with_a_draft_gives_its_own_greedy_images(tmp_path):
    import numpy as np

    from delvm.cli import main
    from delvm.inference.prompting import VisualPrompter
    from delvm.model.checkpoint import save_model
    from tests.support.tiny import tiny_tokenizer_and_model

    tokenizer, model = tiny_tokenizer_and_model()
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    pairs, queries = [(pictures[0], pictures[1]), (pictures[2], pictures[3])], pictures[4:]
    alone = VisualPrompter(model, tokenizer)(pairs, queries, GREEDY)
    drafted = VisualPrompter(model, tokenizer, draft=draft, draft_tokens=3)(pairs, queries, GREEDY)
    assert all(np.array_equal(a, b) for a, b in zip(alone, drafted, strict=True))

    tokenizer.save_pretrained(tmp_path / "tok")
    save_model(model, tmp_path / "model", tokenizer_fingerprint=tokenizer.fingerprint())
    save_model(draft, tmp_path / "draft", tokenizer_fingerprint=tokenizer.fingerprint())
    save_model(draft, tmp_path / "other", tokenizer_fingerprint="0123456789abcdef")
    files = []
    for i, picture in enumerate(pictures[:3]):
        files.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(picture).save(files[-1])
    args = ["prompt", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"),
            "--examples", *files[:2], "--query", files[2], "--device", "cpu"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "alone")]) == 0
    assert (
        main([*args, "--out", str(tmp_path / "drafted"), "--draft", str(tmp_path / "draft")]) == 0
    )
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "alone" / "img2_output.png")),
        np.asarray(Image.open(tmp_path / "drafted" / "img2_output.png")),
    )
    assert main([*args, "--out", str(tmp_path / "x"), "--draft", str(tmp_path / "other")]) == 2


@pytest.mark.slow
def test_sampled_codes_follow_the_target_distribution_when_drafts_stop_early():
    """With a draft threshold, where a pass stops depends on the codes the draft drew; each
    code still follows the target. One row per call (a batch stops where any row would), 800
    calls over 4 codes, 3 drafted at most: codes 2 and 3 jointly and code 4 tested exactly."""
    v = 4
    target = tiny_model(2, vocab=v, scale=3.0)
    draft = tiny_model(3, "vit", vocab=v, scale=3.0)
    prompt = torch.randint(0, v, (1, 10))
    generator = Generator(target, draft=draft, draft_tokens=3, draft_threshold=0.4)
    calls = 800
    out = torch.cat(
        [generator(prompt, 4, SamplingConfig(temperature=1.0, seed=i)) for i in range(calls)]
    )
    stats = generator.stats
    assert calls < stats.passes and stats.drafted < 3 * stats.passes  # some stopped short
    with torch.no_grad():
        after = [prompt]  # every continuation of the prompt by 0, 1, 2 codes
        for _ in range(3):
            grown = after[-1].repeat_interleave(v, 0)
            after.append(torch.cat([grown, torch.arange(v).repeat(len(after[-1]))[:, None]], 1))
        joint = torch.ones(1)
        for seqs in after:  # joint [v ** (i + 1)] of codes 1..i+1, extended one code at a time
            joint = (joint[:, None] * target(seqs)[:, -1].softmax(-1)).flatten()
    joint = joint.view(v, v, v, v)
    counts23 = torch.bincount(out[:, 1] * v + out[:, 2], minlength=v * v).float()
    counts4 = torch.bincount(out[:, 3], minlength=v).float()
    assert chi_square_p_value(counts23, joint.sum((0, 3)).flatten()) > 1e-3
    assert chi_square_p_value(counts4, joint.sum((0, 1, 2))) > 1e-3


def test_answer_nll_of_rows_sharing_a_prefix_equals_each_row_alone():
    import numpy as np

    from delvm.inference.prompting import VisualPrompter
    from tests.support.tiny import tiny_tokenizer_and_model

    tokenizer, model = tiny_tokenizer_and_model()
    prompter = VisualPrompter(model, tokenizer)
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    pair, query = (pictures[0], pictures[1]), pictures[2]
    answers = pictures[3:]  # one query, three candidate answers: rows share pair and query
    together = prompter.answer_nll([pair], [query] * 3, answers)
    alone = [prompter.answer_nll([pair], [query], [answer])[0] for answer in answers]
    assert together == pytest.approx(alone, rel=1e-5)
    assert len(set(together)) == 3


def cacheless_speculation(
    target, draft, prompt, new, k, threshold=0.0
) -> tuple[list[int], int, int, int]:
    """Greedy speculative decoding by full forward passes, no caches: codes, passes, drafted,
    kept. A pass drafts no further after a code the draft gave less than ``threshold``."""
    argmax = lambda model, seq: int(model(torch.tensor([seq]))[0, -1].argmax())  # noqa: E731
    top = lambda model, seq: float(model(torch.tensor([seq]))[0, -1].softmax(-1).max())  # noqa: E731
    seq = prompt.tolist()
    with torch.no_grad():
        seq.append(argmax(target, seq))
        passes = drafted = kept = 0
        while len(seq) - len(prompt) < new:
            proposal = []
            for _ in range(min(k, new - (len(seq) - len(prompt)) - 1)):
                proposal.append(argmax(draft, seq + proposal))
                if top(draft, seq + proposal[:-1]) < threshold:
                    break
            drafted += len(proposal)
            n = 0
            while n < len(proposal) and proposal[n] == argmax(target, seq + proposal[:n]):
                n += 1
            seq += proposal[:n] + [argmax(target, seq + proposal[:n])]
            passes, kept = passes + 1, kept + n
    return seq[len(prompt) :], passes, drafted, kept


@pytest.mark.parametrize("draft_tokens, threshold", [(2, 0.0), (5, 0.0), (5, 0.6)])
def test_drafts_are_what_the_draft_predicts_after_the_kept_codes(target, draft_tokens, threshold):
    """The draft's cache follows the kept codes: its proposals, and so how many are drafted and
    kept and how many passes run, are those of a cacheless reference (with a threshold too)."""
    draft = drafts(target)["noisy"]
    prompt = torch.randint(0, target.config.vocab_size, (1, 20))
    generator = Generator(target, draft=draft, draft_tokens=draft_tokens, draft_threshold=threshold)
    out = generator(prompt, 30, GREEDY)
    reference = cacheless_speculation(target, draft, prompt[0], 30, draft_tokens, threshold)
    codes, passes, drafted, kept = reference
    assert out[0].tolist() == codes
    stats = generator.stats
    assert (stats.passes, stats.drafted, stats.accepted) == (passes, drafted, kept)
    assert 0 < kept < drafted
    if threshold:  # some passes stopped short of draft_tokens
        assert drafted < draft_tokens * (passes - 1)


@pytest.mark.parametrize(
    "draft_name, threshold", [("itself", 0.0), ("wrong", 0.0), ("noisy", 0.0), ("noisy", 0.5)]
)
def test_static_speculation_gives_the_dynamic_codes(target, draft_name, threshold):
    """Static draft steps (one code each) and static passes of the model (up to k + 1 codes)
    keep every code, greedy and sampled, batched and alone, and the caches kept between calls
    serve a second round."""
    draft = drafts(target)[draft_name]
    dynamic = Generator(target, draft=draft, draft_tokens=3, draft_threshold=threshold)
    static = Generator(target, draft=draft, draft_tokens=3, draft_threshold=threshold, static=True)
    torch.manual_seed(2)
    context = torch.randint(0, target.config.vocab_size, (1, 24)).expand(3, -1)
    prompts = [torch.cat([context, torch.randint(0, 512, (3, 6))], 1), context[:1]]
    for _ in range(2):
        for prompt in prompts:
            for sampling in (GREEDY, SamplingConfig(temperature=1.0, seed=3)):
                assert torch.equal(static(prompt, 29, sampling), dynamic(prompt, 29, sampling))
    assert static.stats == dynamic.stats


@pytest.mark.parametrize("draft_tokens", [3, 8])
def test_int8_decoding_with_a_draft_gives_its_own_greedy_codes(target, draft_tokens):
    """A pass over several codes and a step over one read the int8 weights alike."""
    prompt = torch.randint(0, target.config.vocab_size, (2, 30))
    alone = Generator(target, decode_dtype=torch.int8)(prompt, 41, GREEDY)
    draft = drafts(target)["noisy"]
    drafting = Generator(target, torch.int8, draft=draft, draft_tokens=draft_tokens)
    assert torch.equal(drafting(prompt, 41, GREEDY), alone)
    assert 0.0 < drafting.stats.acceptance < 1.0
