import copy

import pytest
import torch

from delvm.errors import DelvmError
from delvm.inference.generate import Generator, SamplingConfig, generate
from delvm.model.transformer import VisualLM, preset


@pytest.fixture(scope="module", params=["tiny", "tiny-vit"])
def model(request):
    torch.manual_seed(0)
    model = VisualLM(preset(request.param)).eval()
    # Larger output weights so sampling distributions are not nearly uniform.
    with torch.no_grad():
        model.head.weight.mul_(20)
    return model


def test_kv_cache_logits_equal_full_forward(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 48)
        prefill = model(ids[:, :20], cache=cache, start=0)
        chunk = model(ids[:, 20:30], cache=cache, start=20)  # a chunk after a cached prefix
        steps = [model(ids[:, t : t + 1], cache=cache, start=t) for t in range(30, 48)]
    incremental = torch.cat([prefill, chunk, *steps], dim=1)
    assert (incremental - full).abs().max() < 1e-5


def test_greedy_matches_step_by_step_argmax(model):
    prompt = torch.randint(0, model.config.vocab_size, (1, 10))
    out = generate(model, prompt, 12, SamplingConfig(temperature=0))
    seq = prompt
    for _ in range(12):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq[:, 10:])


def test_batch_equals_single_prompts(model):
    prompts = torch.randint(0, model.config.vocab_size, (3, 16))
    batched = generate(model, prompts, 8, SamplingConfig(temperature=0))
    for row in range(3):
        single = generate(model, prompts[row : row + 1], 8, SamplingConfig(temperature=0))
        assert torch.equal(batched[row : row + 1], single)


def test_sampling_is_seeded_and_in_range(model):
    prompt = torch.randint(0, model.config.vocab_size, (4, 8))
    a = generate(model, prompt, 30, SamplingConfig(temperature=1.0, seed=1))
    b = generate(model, prompt, 30, SamplingConfig(temperature=1.0, seed=1))
    c = generate(model, prompt, 30, SamplingConfig(temperature=1.0, seed=2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (4, 30)
    assert a.min() >= 0 and a.max() < model.config.vocab_size


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompt = torch.randint(0, model.config.vocab_size, (2, 8))
    greedy = generate(model, prompt, 10, SamplingConfig(temperature=0))
    assert torch.equal(generate(model, prompt, 10, SamplingConfig(top_k=1, seed=5)), greedy)
    assert torch.equal(generate(model, prompt, 10, SamplingConfig(top_p=1e-6, seed=5)), greedy)


def test_top_k_restricts_the_choices(model):
    prompt = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        allowed = set(model(prompt)[0, -1].topk(3).indices.tolist())
    firsts = {
        generate(model, prompt, 1, SamplingConfig(top_k=3, temperature=5.0, seed=s)).item()
        for s in range(40)
    }
    assert firsts <= allowed
    assert len(firsts) > 1


def test_top_p_keeps_the_nucleus():
    from delvm.inference.generate import _filter_logits

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = _filter_logits(probs.log(), None, 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = _filter_logits(probs.log(), None, 0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = _filter_logits(probs.log(), None, 0.81).isfinite()
    assert kept.tolist() == [[True, True, True, False]]


def test_bf16_decoding_keeps_fp32_prefill_and_mostly_agrees(model):
    prompt = torch.randint(0, model.config.vocab_size, (2, 16))
    generator = Generator(model, decode_dtype=torch.bfloat16)
    assert generator.decoder.head.weight.dtype == torch.bfloat16
    assert model.head.weight.dtype == torch.float32  # the caller's model is untouched
    fast = generator(prompt, 20, SamplingConfig(temperature=0))
    exact = generate(model, prompt, 20, SamplingConfig(temperature=0))
    assert fast[:, 0].equal(exact[:, 0])  # the first token comes from the fp32 prefill
    assert (fast == exact).float().mean() > 0.5  # chance agreement would be ~1/512


def test_bad_generation_arguments(model):
    with pytest.raises(DelvmError, match="max_seq_len"):
        generate(model, torch.zeros(1, 250, dtype=torch.long), 10)
    with pytest.raises(DelvmError, match="prompt ids"):
        generate(model, torch.full((1, 4), model.config.vocab_size), 2)
    with pytest.raises(DelvmError, match="top_p"):
        SamplingConfig(top_p=1.5)


def test_shared_prefix_is_prefilled_once_and_changes_no_output(model, monkeypatch):
    from delvm.inference import generate as generate_module

    context = torch.randint(0, model.config.vocab_size, (1, 60))
    queries = torch.randint(0, model.config.vocab_size, (4, 12))
    queries[:, 0] = queries[0, 0]  # the rows share one more code than the context
    prompt = torch.cat([context.expand(4, -1), queries], dim=1)
    assert generate_module.shared_prefix_length(prompt) == 61
    prefilled = []
    hidden_states = VisualLM.hidden_states

    def counting(self, x, *args, **kwargs):
        prefilled.append(tuple(x.shape[:2]))
        return hidden_states(self, x, *args, **kwargs)

    monkeypatch.setattr(VisualLM, "hidden_states", counting)
    generator = Generator(model)
    outputs = {}
    for sampling in (SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, seed=3)):
        prefilled.clear()
        outputs[sampling.temperature] = generator(prompt, 20, sampling)
        assert prefilled[:2] == [(1, 61), (4, 11)]  # the prefix once, then each row's rest
        prefilled.clear()
        whole = Generator(model, share_prefix=False)(prompt, 20, sampling)
        assert prefilled[0] == (4, 72)
        assert torch.equal(outputs[sampling.temperature], whole)
    # One row runs as one prefill.
    prefilled.clear()
    single = generator(prompt[:1], 20)
    assert prefilled[0] == (1, 72)
    assert torch.equal(single, outputs[0][:1])


def test_prefill_keeps_the_last_positions_logits(model):
    from delvm.inference.generate import prefill

    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    ids[:, :25] = ids[0, :25]
    ids[:, 30] = ids[0, 30]  # a later match is not part of the shared prefix
    with torch.no_grad():
        full = model(ids)
        cache, last = prefill(model, ids, 48, keep=10)
        assert (last - full[:, -10:]).abs().max() < 1e-5
        # Rows that are all equal still keep `keep` positions of their own.
        same = ids[:1].expand(3, -1)
        _, last = prefill(model, same, 40, keep=40)
        assert (last - model(same)).abs().max() < 1e-5
        # The cache continues as a whole-row prefill's would.
        step = model(ids[:, :1], cache=cache, start=40)
        reference = model(torch.cat([ids, ids[:, :1]], dim=1))[:, -1:]
        assert (step - reference).abs().max() < 1e-5


def test_shared_prefix_in_bf16_matches_whole_rows_to_bf16_rounding(model):
    """A GPU runs weights and cache in bf16: the cascade is as close to fp32 as whole rows."""
    from delvm.inference.generate import prefill

    half = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    ids[:, :30] = ids[0, :30]
    with torch.no_grad():
        _, shared = prefill(half, ids, 48, keep=10)
        _, whole = prefill(half, ids, 48, keep=10, share_prefix=False)
        _, exact = prefill(model, ids, 48, keep=10, share_prefix=False)
    error = (shared.float() - exact).abs().max()
    assert error <= 1.5 * (whole.float() - exact).abs().max() + 1e-3 * exact.abs().max()


def test_attention_lse_of_bf16_inputs_keeps_fp32_scores():
    from delvm.model.transformer import attention_and_lse

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16).mul(3).bfloat16() for _ in range(3))
    out, lse = attention_and_lse(q, k, v, None)
    scores = q.double() @ k.double().transpose(-1, -2) / 4  # the same bf16 values, exactly
    assert (lse.double() - scores.logsumexp(-1, keepdim=True)).abs().max() < 1e-4
    expected = scores.softmax(-1) @ v.double()
    assert (out.double() - expected).abs().max() < 0.05  # bf16 probabilities and output


def _shared_context_prompt(vocab: int, batch: int) -> torch.Tensor:
    """``batch`` rows: one 40-code context, then 10 codes of each row's own."""
    context = torch.randint(0, vocab, (1, 40)).expand(batch, -1)
    return torch.cat([context, torch.randint(0, vocab, (batch, 10))], dim=1)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_static_decoding_gives_the_dynamic_codes(model, share_prefix):
    torch.manual_seed(1)
    dynamic = Generator(model, share_prefix=share_prefix)
    static = Generator(model, share_prefix=share_prefix, static=True)
    prompts = [_shared_context_prompt(model.config.vocab_size, 3)]
    prompts += [prompts[0][:1], torch.randint(0, model.config.vocab_size, (3, 30))]
    samplings = [SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, seed=4)]
    # Twice over: the second round reuses the caches the static generator kept.
    for _ in range(2):
        for prompt in prompts:
            for sampling in samplings:
                assert torch.equal(static(prompt, 24, sampling), dynamic(prompt, 24, sampling))


def test_static_steps_keep_their_shapes(model, monkeypatch):
    """Every decoding step writes at a tensor position and reads the whole cache, masked."""
    from delvm.model.transformer import KVCache

    steps = []
    update = KVCache.update

    def recording(self, layer, start, k, v):
        keys, values = update(self, layer, start, k, v)
        steps.append((isinstance(start, torch.Tensor), tuple(keys.shape)))
        return keys, values

    monkeypatch.setattr(KVCache, "update", recording)
    torch.manual_seed(0)
    prompt = _shared_context_prompt(model.config.vocab_size, 3)
    Generator(model, static=True)(prompt, 12)
    layers = model.config.num_layers
    decoding = steps[-11 * layers :]  # 11 steps after the prefill's first code
    assert all(static for static, _ in decoding)
    assert len({shape for _, shape in decoding}) == 1
    assert decoding[0][1][2] == 62 - 40  # the rows' positions after the shared 40 codes


def test_static_bf16_decoding_gives_the_dynamic_codes(model):
    prompt = _shared_context_prompt(model.config.vocab_size, 3)
    dynamic = Generator(model, decode_dtype=torch.bfloat16)(prompt, 20)
    assert torch.equal(
        Generator(model, decode_dtype=torch.bfloat16, static=True)(prompt, 20), dynamic
    )


@pytest.mark.slow
def test_compiled_decoding_compiles_every_shape(monkeypatch):
    """Each prompt length compiles its own graphs, past torch's default limit of 8 graphs per
    function (beyond which dynamo runs new shapes eagerly): the draft's step and the model's
    passes of 1 to 5 codes, for two prompt lengths."""
    graphs = []

    def counting_compile(model, dynamic, options):  # dynamo as used, without inductor's time
        def backend(graph, inputs):
            graphs.append(graph)
            return graph.forward

        return compile_(model, dynamic=dynamic, backend=backend)

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()  # graphs other tests compiled count towards the limit too
    torch.manual_seed(0)
    model, draft = VisualLM(preset("tiny")).eval(), VisualLM(preset("tiny")).eval()
    generator = Generator(model, draft=draft, draft_tokens=4, compile=True)
    compiled = []
    for length in (12, 16):
        before = len(graphs)
        generator(torch.randint(0, 512, (1, length)), 12, SamplingConfig(temperature=0))
        compiled.append(len(graphs) - before)
    # An unrelated draft keeps almost nothing: every pass reads the newest code and 4 drafts
    # (1 to 4 near the end), and the draft reads one code per step.
    assert compiled == [6, 6], compiled


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_codes():
    """The compiled step (inductor on a CPU) continues as the eager static step does."""
    torch.manual_seed(0)
    model = VisualLM(preset("tiny")).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)
    compiled, eager = Generator(model, compile=True), Generator(model, static=True)
    for prompt in (_shared_context_prompt(512, 3), _shared_context_prompt(512, 1)):
        for sampling in (SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, seed=2)):
            assert torch.equal(compiled(prompt, 16, sampling), eager(prompt, 16, sampling))
    # bf16 decoding too: the compiled kernels round where the eager ones do (else some of
    # these 150 codes differ).
    compiled = Generator(model, torch.bfloat16, compile=True)
    eager = Generator(model, torch.bfloat16, static=True)
    prompt = _shared_context_prompt(512, 3)
    assert torch.equal(compiled(prompt, 150), eager(prompt, 150))
    # int8 decoding: the compiled step calls the same int8 kernel (`delvm.inference.quantize`).
    compiled = Generator(model, torch.int8, compile=True)
    eager = Generator(model, torch.int8, static=True)
    assert torch.equal(compiled(prompt, 150), eager(prompt, 150))
    # Speculative decoding compiles both of its steps: the draft's one-code step and the
    # model's pass over the k + 1 drafted codes.
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    compiled = Generator(model, draft=draft, draft_tokens=3, compile=True)
    eager = Generator(model, draft=draft, draft_tokens=3, static=True)
    for prompt in (_shared_context_prompt(512, 3), _shared_context_prompt(512, 1)):
        for sampling in (SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, seed=2)):
            assert torch.equal(compiled(prompt, 30, sampling), eager(prompt, 30, sampling))
    assert compiled.stats == eager.stats and 0 < compiled.stats.acceptance < 1
