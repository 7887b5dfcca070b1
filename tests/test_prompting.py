"""Visual prompting end to end on a tiny random tokenizer and model."""

import numpy as np
import pytest
import torch
from PIL import Image

from delvm.cli import main
from delvm.errors import DelvmError
from delvm.inference.generate import SamplingConfig
from delvm.inference.prompting import VisualPrompter, save_grid
from delvm.model.checkpoint import save_model
from delvm.model.transformer import VisualLM, preset
from tests.support.tiny import tiny_tokenizer_and_model


@pytest.fixture(scope="module")
def parts():
    return tiny_tokenizer_and_model()


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_prompt_is_examples_then_query_and_batches_agree(parts):
    tokenizer, model = parts
    prompter = VisualPrompter(model, tokenizer)
    pairs = list(zip(images(2, 1), images(2, 2), strict=True))
    queries = images(3, 3)
    greedy = SamplingConfig(temperature=0)
    batched = prompter(pairs, queries, greedy)
    assert len(batched) == 3 and batched[0].shape == (32, 32, 3) and batched[0].dtype == np.uint8
    for query, output in zip(queries, batched, strict=True):
        assert np.array_equal(prompter(pairs, [query], greedy)[0], output)
    # The prompt the model sees: example pairs in order, then the query.
    flat = [image for pair in pairs for image in pair]
    expected = torch.cat([tokenizer.encode(np.stack(flat)).reshape(1, -1),
                          tokenizer.encode(np.stack(queries[:1]))], dim=1)  # fmt: skip
    new = prompter.generator(expected, 256, greedy)
    decoded = (tokenizer.decode(new).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(decoded[0], batched[0])


def test_answer_nll_is_transformers_loss_on_the_answer_tokens(parts, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from delvm.model.hf import load_hf_model

    tokenizer, _ = parts
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=False)  # fmt: skip
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    prompter = VisualPrompter(load_hf_model(tmp_path / "hf").eval(), tokenizer)
    pair, queries, answers = (images(1, 1)[0], images(1, 2)[0]), images(2, 3), images(2, 4)
    ours = prompter.answer_nll([pair], queries, answers)
    for query, answer, nll in zip(queries, answers, ours, strict=True):
        ids = tokenizer.encode(np.stack([*pair, query, answer])).reshape(1, -1)
        labels = ids.clone()
        labels[:, : -prompter.image_tokens] = -100  # the loss on the answer's tokens only
        with torch.no_grad():
            expected = reference(input_ids=ids, labels=labels).loss.item()
        assert nll == pytest.approx(expected, rel=1e-5)
    with pytest.raises(DelvmError, match="one answer per query"):
        prompter.answer_nll([pair], queries, answers[:1])


def test_inpaint_keeps_the_top_half(parts):
    tokenizer, model = parts
    prompter = VisualPrompter(model, tokenizer)
    source = images(1, 5)
    greedy = SamplingConfig(temperature=0)
    out = prompter.inpaint(source, greedy)[0]
    top = tokenizer.encode(np.stack(source))[:, :128]
    ids = torch.cat([top, prompter.generator(top, 128, greedy)], dim=1)
    expected = (tokenizer.decode(ids)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_next_frame_continues_the_frames_in_time_order():
    tokenizer, model = tiny_tokenizer_and_model(prompt_sensitive=True)
    prompter = VisualPrompter(model, tokenizer)
    # Black, grey, white: a clip whose answer changes when its frames are read out of order.
    frames = [np.full((32, 32, 3), value, np.uint8) for value in (0, 128, 255)]
    greedy = SamplingConfig(temperature=0)
    out = prompter.next_frame(frames, greedy)
    # One batch, as the prompter encodes (a batch of 1 may round a near-tie code otherwise).
    clip = tokenizer.encode(np.stack(frames)).reshape(1, -1)  # f1 f2 f3
    ids = prompter.generator(clip, 256, greedy)
    expected = (tokenizer.decode(ids)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_mismatched_tokenizer_and_long_prompts_are_errors(parts):
    tokenizer, model = parts
    other = VisualLM(preset("tiny", vocab_size=128, codebook_dim=8))
    with pytest.raises(DelvmError, match="codes"):
        VisualPrompter(other, tokenizer)
    with pytest.raises(DelvmError, match="trained with tokenizer"):
        VisualPrompter(model, tokenizer, model_fingerprint="0123456789abcdef")
    pairs = list(zip(images(3), images(3), strict=True))
    with pytest.raises(DelvmError, match="fewer example pairs"):
        VisualPrompter(model, tokenizer)(pairs, images(1))


def test_prompt_cli_writes_outputs_and_a_grid(parts, tmp_path):
    tokenizer, model = parts
    tokenizer.save_pretrained(tmp_path / "tok")
    save_model(model, tmp_path / "ckpt", tokenizer_fingerprint=tokenizer.fingerprint())
    files = []
    for i, image in enumerate(images(3, 9)):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.kron(image, np.ones((2, 2, 1), np.uint8))).save(files[-1])  # 64 px
    args = ["prompt", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok"),
            "--examples", str(files[0]), str(files[1]), "--query", str(files[2]),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    assert Image.open(tmp_path / "out" / "img2_output.png").size == (32, 32)
    assert Image.open(tmp_path / "out" / "grid.png").size == (4 * 32 + 3 * 4, 32)
    assert main([*args[:-1], str(tmp_path / "out"), "--examples", str(files[0])]) == 2


def test_save_grid_layout(tmp_path):
    a, b = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)
    grid = np.asarray(Image.open(save_grid([[a, b], [b]], tmp_path / "g.png")))
    assert grid.shape == (20, 20, 3)
    assert grid[0, 0, 0] == 0 and grid[0, 12, 0] == 200 and grid[12, 12, 0] == 255


def same_but_rounding(a: np.ndarray, b: np.ndarray) -> bool:
    """The same image up to one level per pixel: the tokenizer decodes a batch of another size
    with other float sums, which can round a pixel that lies at .5 the other way."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def test_batch_size_bounds_each_batch_and_keeps_greedy_outputs(parts):
    tokenizer, model = parts
    pairs = list(zip(images(1, 1), images(1, 2), strict=True))
    queries, answers = images(5, 3), images(5, 4)
    whole = VisualPrompter(model, tokenizer, batch_size=16)
    chunked = VisualPrompter(model, tokenizer, batch_size=2)
    rows_seen, generate = [], chunked.generator

    def recording(prompts, *args):
        rows_seen.append(len(prompts))
        return generate(prompts, *args)

    chunked.generator = recording
    greedy = SamplingConfig(temperature=0)
    for a, b in zip(whole(pairs, queries, greedy), chunked(pairs, queries, greedy), strict=True):
        assert same_but_rounding(a, b)
    assert rows_seen == [2, 2, 1]
    assert chunked.answer_nll(pairs, queries, answers) == pytest.approx(
        whole.answer_nll(pairs, queries, answers), rel=1e-5
    )
    for a, b in zip(whole.inpaint(queries, greedy), chunked.inpaint(queries, greedy), strict=True):
        assert same_but_rounding(a, b)
    with pytest.raises(DelvmError, match="batch size must be >= 1"):
        VisualPrompter(model, tokenizer, batch_size=0)


def test_seeded_sampling_draws_each_batch_from_its_own_stream(parts):
    tokenizer, model = parts
    prompter = VisualPrompter(model, tokenizer, batch_size=1)
    pairs = list(zip(images(1, 1), images(1, 2), strict=True))
    same_query_twice = images(1, 3) * 2
    sampling = SamplingConfig(temperature=1.0, seed=5)
    first, second = prompter(pairs, same_query_twice, sampling)
    assert not np.array_equal(first, second)  # batch 2 draws with seed 6, not seed 5 again
    again = prompter(pairs, same_query_twice, sampling)
    assert np.array_equal(again[0], first) and np.array_equal(again[1], second)
    alone = prompter(pairs, same_query_twice[:1], sampling)[0]
    assert np.array_equal(alone, first)  # as before batching: one batch draws with the seed


def test_compile_flag_reaches_every_generating_verb(parts, tmp_path, monkeypatch, capsys):
    from delvm.cli import build_parser

    parser = build_parser()
    for verb in (["prompt", "c", "--examples", "a", "b", "--query", "q", "--out", "o"],
                 ["inpaint", "c", "i", "--out", "o"], ["next-frame", "c", "f", "--out", "o"],
                 ["serve", "c"], ["eval-pascal5i", "c", "--voc", "v"]):  # fmt: skip
        assert parser.parse_args(verb).compile is False
        assert parser.parse_args([*verb, "--compile"]).compile is True
    # With a draft too: both reach the generator (compiled here as eager static steps: the
    # compiled step has its own slow test in test_generate.py).
    import delvm.inference.prompting as prompting

    made, generator_class = [], prompting.Generator

    def recording(model, decode_dtype, draft, draft_tokens, draft_threshold, compile):
        made.append((draft is not None, draft_tokens, draft_threshold, compile))
        return generator_class(model, decode_dtype, draft, draft_tokens, draft_threshold,
                               static=compile)  # fmt: skip

    monkeypatch.setattr(prompting, "Generator", recording)
    tokenizer, model = parts
    tokenizer.save_pretrained(tmp_path / "tok")
    save_model(model, tmp_path / "ckpt", tokenizer_fingerprint=tokenizer.fingerprint())
    Image.fromarray(images(1)[0]).save(tmp_path / "q.png")
    args = ["inpaint", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok"),
            str(tmp_path / "q.png"), "--out", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    draft = ["--draft", str(tmp_path / "ckpt"), "--draft-tokens", "3", "--draft-threshold", "0.5"]
    assert main([*args, "--compile", *draft]) == 0
    assert made == [(True, 3, 0.5, True)]
    assert (tmp_path / "out" / "q_inpainted.png").is_file()
    # Drafting settings without a draft model name the missing flag.
    assert main([*args, "--draft-threshold", "0.5"]) == 2
    assert "--draft-threshold set how a draft model drafts: pass --draft" in capsys.readouterr().err
    assert len(made) == 1


def test_dtype_int8_prefills_in_fp32_and_decodes_with_int8_copies(parts, tmp_path, monkeypatch):
    from delvm.inference import prompting
    from delvm.inference.quantize import Int8Linear

    tokenizer, model = parts
    tokenizer.save_pretrained(tmp_path / "tok")
    save_model(model, tmp_path / "ckpt", tokenizer_fingerprint=tokenizer.fingerprint())
    prompter = prompting.load_prompter(tmp_path / "ckpt", tmp_path / "tok", "cpu", "int8")
    assert prompter.model.head.weight.dtype == torch.float32  # the prefill's weights
    assert isinstance(prompter.generator.decoder.head, Int8Linear)
    pairs = list(zip(images(1, 1), images(1, 2), strict=True))
    (answer,) = prompter(pairs, images(1, 3))
    assert answer.shape == (32, 32, 3) and answer.dtype == np.uint8
    # On a GPU it names the dtype that works there.
    monkeypatch.setattr(prompting, "resolve_device", lambda name: torch.device("cuda"))
    with pytest.raises(DelvmError, match="--dtype int8 decodes on CPUs, not on cuda.*auto"):
        prompting.load_prompter(tmp_path / "ckpt", tmp_path / "tok", "cuda", "int8")
