"""Autoregressive generation with a preallocated KV cache: one prefill, then one token per step.

Visual prompting calls this to produce an answer image: e.g. 256 new tokens after a 1792-token
prompt (three example pairs and a query). Every code is a valid token, so generation never stops
early; it always produces exactly ``max_new_tokens``.

Many queries under the same example pairs share those pairs' tokens: `prefill` runs the prefix
that every row of a batch shares once, at batch 1, into a cache every row reads (`KVCache` with a
prefix), so only the queries are prefilled per row, and each decoding step reads the pairs' keys
and values once for the whole batch instead of once per row.

A smaller model with the same codes may draft tokens for the model (speculative decoding,
Leviathan et al. 2023 / Chen et al. 2023): the draft proposes k codes one at a time, the model
reads them all in one pass, and `accept_drafts` keeps the longest run it agrees with plus one
code of its own. Greedy output is the model's own greedy output; sampled output follows the
model's own distribution. Decoding is bound by reading the weights, so the model's one pass over
k + 1 codes costs about what one step costs, and every accepted draft saves a step.

On a GPU a small model's step is a few hundred short kernels, each launched by Python: a
static-shape step (the same shapes every step: the whole preallocated cache under a mask, the
position a tensor; see `KVCache`) can be compiled once and replayed as one CUDA graph
(``Generator(..., compile=True)``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from delvm.errors import DelvmError
from delvm.inference.quantize import int8_copy
from delvm.model.transformer import KVCache, VisualLM

# Graphs torch.compile may keep for a model's decoding step. Each shape is a graph of its own
# (dynamic=False): every batch, prompt length and pass length, and the draft's steps count
# with the model's (they share `VisualLM.forward`). Past torch's default of 8, new shapes
# would run eagerly without a word, e.g. a second prompt length with a draft of 4 codes.
COMPILED_GRAPHS = 64


@dataclass
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` means greedy (argmax), the default:
    task scores and `delvm prompt` take the most likely image unless told to sample."""

    temperature: float = 0.0
    top_k: int | None = None  # keep the k most likely codes
    top_p: float | None = None  # keep the smallest set of codes whose probability reaches p
    seed: int | None = 0  # seeds a private generator: same seed, same prompt, same output

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise DelvmError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise DelvmError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise DelvmError(f"top_p must be in (0, 1], got {self.top_p}")


def _filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) sets to -inf. logits: [..., V]."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a code when the codes ranked above it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probabilities(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """The distribution a sampled code is drawn from: logits [..., V] -> probabilities (fp32)."""
    logits = _filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return logits.softmax(-1)


def next_token(
    logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> Tensor:
    """Choose one code per row from last-position logits [B, V] -> [B]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    return _draw(probabilities(logits, sampling), generator)


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def accept_drafts(
    target: Tensor,
    draft: Tensor,
    drafted: Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[int, Tensor]:
    """Speculative decoding's rule: which drafted codes to keep, and the code that follows them.

    ``drafted`` [B, k] are the draft's codes, ``draft`` [B, k, V] the draft's logits they were
    chosen from, ``target`` [B, k + 1, V] the model's logits after each of them (and before the
    first). Greedy: a drafted code is kept while it is the model's argmax, and the model's argmax
    follows. Sampled: code i is kept with probability min(1, p_i / q_i); after the first one
    rejected, a code is drawn from max(0, p - q) renormalised; after k kept, one is drawn from
    p_{k+1}. Each kept or drawn code is then distributed as the model's own next code.

    All rows of a batch advance together: returns n, the drafted codes every row keeps (the
    fewest any row keeps), and each row's code at position n [B]: its drafted code where that
    row kept it too (a valid draw, as its own acceptance test passed), else its own draw.
    """
    k = drafted.shape[1]
    if sampling.temperature == 0:
        best = target.argmax(-1)
        kept = best[:, :k] == drafted
        n = int(kept.int().cumprod(1).sum(1).min())
        return n, best[:, n]
    p, q = probabilities(target, sampling), probabilities(draft, sampling)
    p_drafted = p[:, :k].gather(-1, drafted[..., None]).squeeze(-1)
    q_drafted = q.gather(-1, drafted[..., None]).squeeze(-1)  # > 0: the draft drew these codes
    uniform = torch.rand(p_drafted.shape, generator=generator, device=p.device)
    kept = uniform * q_drafted < p_drafted
    n = int(kept.int().cumprod(1).sum(1).min())
    if n == k:
        return n, _draw(p[:, k], generator)
    residual = (p[:, n] - q[:, n]).clamp(min=0)
    # Rows that kept code n may have p == q there, an all-zero residual they never use.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, n])
    return n, torch.where(kept[:, n], drafted[:, n], _draw(residual, generator))


def shared_prefix_length(ids: Tensor) -> int:
    """How many leading ids all rows of ``ids`` [B, T] have in common."""
    same = (ids == ids[:1]).all(0)
    return int(same.int().cumprod(0).sum())


def prefill(
    model: VisualLM,
    ids: Tensor,
    cache_len: int,
    keep: int = 1,
    share_prefix: bool = True,
    new_cache: Callable[..., KVCache] | None = None,
) -> tuple[KVCache, Tensor]:
    """Run ``ids`` [B, T] into a new KV cache of ``cache_len`` positions; return the cache and
    the logits of the last ``keep`` positions [B, keep, V].

    With ``share_prefix`` (and B > 1) the leading ids all rows share, up to the last ``keep``,
    run once at batch 1 into a prefix cache that every row's cache reads. The result equals
    running every row whole, to float rounding (the matmuls see other shapes). ``new_cache``
    ``(batch, max_len, prefix=None)`` gives the caches (default: the model's `new_cache`).
    """
    new_cache = new_cache or model.new_cache
    batch, length = ids.shape
    shared = min(shared_prefix_length(ids), length - keep) if share_prefix and batch > 1 else 0
    prefix = None
    if shared > 0:
        prefix = new_cache(1, shared)
        model.hidden_states(model.embed(ids[:1, :shared]), prefix)
    cache = new_cache(batch, cache_len, prefix=prefix)
    hidden = model.hidden_states(model.embed(ids[:, shared:]), cache, start=shared)
    return cache, model.head(hidden[:, -keep:])


def _decode_copy(model: VisualLM, dtype: torch.dtype | None) -> VisualLM:
    if dtype == torch.int8:
        return int8_copy(model)
    if dtype is None or dtype == model.head.weight.dtype:
        return model
    return copy.deepcopy(model).to(dtype)


@dataclass
class DraftStats:
    """What speculative decoding did over a generator's calls (per row: rows advance together)."""

    passes: int = 0  # the model's forward passes after the prefill
    drafted: int = 0  # codes the draft proposed
    accepted: int = 0  # of those, codes kept

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


class Generator:
    """Generates continuations with a model, optionally decoding with reduced-precision weights.

    Decoding one token at a time is bound by reading every weight once per step, so on CPU a bf16
    copy of the weights (``decode_dtype=torch.bfloat16``) decodes faster. The prompt is still
    prefilled by the model as given (large fp32 matmuls are much faster than bf16 ones on CPUs
    without bf16 units), and the KV cache stays in the model's dtype. ``decode_dtype=torch.int8``
    decodes with int8 weights and bf16 activations instead (`delvm.inference.quantize`; CPU
    only): faster again, but the answers are those of slightly changed weights. With
    ``decode_dtype=None`` every step runs in the model's own precision (what the parity tests
    check).

    With a ``draft`` model (same codes, e.g. the distilled student), it drafts up to
    ``draft_tokens`` codes per pass of the model (speculative decoding); ``stats`` counts how
    many were kept. With a ``draft_threshold`` a pass drafts no further once the draft gave a
    code less than that probability (any row of the batch): unlikely drafts are rarely kept, so
    the pass verifies what has been drafted instead. The output does not depend on it.
    The prefix all rows of a batch share is prefilled once (`prefill`) unless ``share_prefix``
    is False.

    With ``static`` every decoding step has the same shapes (`KVCache`: the whole cache under a
    mask, the position a 0-dim tensor), and with ``compile`` (which implies it) that step is
    compiled by torch.compile: on CUDA with CUDA graphs ("reduce-overhead"), so each step
    replays as one graph instead of launching every kernel from Python; elsewhere by inductor.
    The codes are the dynamic path's (sums over other shapes or in fused kernels may round
    otherwise, so a near-tie could differ). The first call with new shapes (batch, prompt
    length, codes to generate, shared prefix) compiles or records anew; later calls with the
    same shapes reuse the step and the caches, which stay allocated between calls (a CUDA graph
    reads and writes the addresses it recorded). With a draft, the draft's step reads one code
    at a time and the model's pass reads the drafted codes and the newest one: both are static
    (and compiled, once per number of codes a pass reads) steps. Compiling raises torch's
    process-wide limit of graphs per function to `COMPILED_GRAPHS`.
    """

    def __init__(
        self,
        model: VisualLM,
        decode_dtype: torch.dtype | None = None,
        draft: VisualLM | None = None,
        draft_tokens: int = 4,
        draft_threshold: float = 0.0,
        share_prefix: bool = True,
        static: bool = False,
        compile: bool = False,
    ):
        self.model, self.draft, self.draft_tokens = model, draft, draft_tokens
        self.draft_threshold = draft_threshold
        self.share_prefix = share_prefix
        self.decoder = _decode_copy(model, decode_dtype)
        self.stats = DraftStats()
        self.static = static or compile
        self.cuda_graphs = compile and self.decoder.head.weight.device.type == "cuda"
        self.compile = compile
        self.step = self._compiled(self.decoder)  # the model's decoding step
        self._kept: dict[tuple[str, int, int, int], KVCache] = {}  # static decoding's caches
        if draft is not None:
            if draft.config.codes != model.config.codes:
                raise DelvmError(
                    f"the draft model predicts {draft.config.codes} codes but the model "
                    f"{model.config.codes}; a draft must use the model's tokenizer"
                )
            if draft_tokens < 1:
                raise DelvmError(f"draft_tokens must be >= 1, got {draft_tokens}")
            if not 0.0 <= draft_threshold <= 1.0:
                raise DelvmError(f"draft_threshold must lie in [0, 1], got {draft_threshold}")
            self.draft_decoder = _decode_copy(draft, decode_dtype)
            self.draft_step = self._compiled(self.draft_decoder)

    def _compiled(self, decoder: VisualLM) -> Callable[..., Tensor]:
        if not self.compile:
            return decoder
        # CUDA graphs are the "reduce-overhead" mode. Rounding bf16 / fp16 where the eager
        # kernels round (not keeping fused intermediates in fp32) keeps the eager codes.
        # One graph per shape, no dynamic shapes: a pass reads 1 to draft_tokens + 1 codes.
        options = {"triton.cudagraphs": self.cuda_graphs, "emulate_precision_casts": True}
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, COMPILED_GRAPHS)
        return torch.compile(decoder, dynamic=False, options=options)

    def _run_step(
        self, step: Callable[..., Tensor], ids: Tensor, cache: KVCache, start: int | Tensor
    ) -> Tensor:
        """One decoding step (a tensor ``start`` for a static one). Under CUDA graphs its
        logits are copied out, as the next replay of a graph overwrites its outputs."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(ids, cache=cache, start=start)
        return logits.clone() if self.cuda_graphs else logits

    @torch.inference_mode()
    def __call__(
        self, prompt: Tensor, max_new_tokens: int, sampling: SamplingConfig | None = None
    ) -> Tensor:
        """Continue each prompt row [B, T] by exactly ``max_new_tokens`` codes; returns [B, N].

        All prompts in a batch have the same length (visual prompts are whole images). Sampled
        ids lie in ``0..codes-1``: logits of ids past the codebook (LVM's spare 100) are dropped.
        """
        model, sampling = self.model, sampling or SamplingConfig()
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise DelvmError(
                f"prompt must be [batch, length>0] token ids, got {tuple(prompt.shape)}"
            )
        codes = model.config.codes
        if prompt.min() < 0 or prompt.max() >= codes:
            raise DelvmError(f"prompt ids must lie in 0..{codes - 1} (the VQ codes)")
        if max_new_tokens < 1:
            raise DelvmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        batch, length = prompt.shape
        total = length + max_new_tokens
        for name, checked in (("model", model), ("draft model", self.draft)):
            if checked is not None and total > checked.config.max_seq_len:
                raise DelvmError(
                    f"prompt ({length}) + new tokens ({max_new_tokens}) exceed the {name}'s "
                    f"max_seq_len {checked.config.max_seq_len}"
                )
        device = model.head.weight.device
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)

        prompt = prompt.to(device)
        cache, logits = prefill(
            model, prompt, total, share_prefix=self.share_prefix, new_cache=self._new_cache("model")
        )
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        # A static step takes its position as a tensor (checked above: total <= max_seq_len).
        positions = torch.arange(total, device=device) if self.static else range(total)
        if self.draft is not None:
            out[:, 0] = next_token(logits[:, -1, :codes], sampling, generator)
            draft_cache, _ = prefill(
                self.draft,
                prompt,
                total,
                share_prefix=self.share_prefix,
                new_cache=self._new_cache("draft"),
            )
            self._speculate(out, length, positions, cache, draft_cache, sampling, generator)
            return out
        for step in range(max_new_tokens):
            token = next_token(logits[:, -1, :codes], sampling, generator)
            out[:, step] = token
            if step + 1 < max_new_tokens:
                logits = self._run_step(self.step, token[:, None], cache, positions[length + step])
        return out

    def _new_cache(self, role: str) -> Callable[..., KVCache]:
        """How `prefill` makes the model's (``role`` "model") or the draft's caches."""
        model = self.model if role == "model" else self.draft
        if not self.static:
            return model.new_cache
        return lambda batch, max_len, prefix=None: self._kept_cache(
            role, model, batch, max_len, prefix
        )

    def _kept_cache(
        self, role: str, model: VisualLM, batch: int, max_len: int, prefix: KVCache | None
    ) -> KVCache:
        """A cache for static decoding: the last call's when the shapes are the same, since a
        CUDA graph replays on the addresses it recorded. A new shape drops the last call's
        caches of that model but the prefix of this call, so a kept cache over a prefix is
        kept with it."""
        key = (role, batch, max_len, 0 if prefix is None else prefix.max_len)
        if key not in self._kept:
            self._kept = {
                k: kept for k, kept in self._kept.items() if k[0] != role or kept is prefix
            }
            self._kept[key] = model.new_cache(batch, max_len, prefix=prefix)
            if self.cuda_graphs:  # read and written in place by the graph, not copied into it
                for tensor in (*self._kept[key].keys, *self._kept[key].values):
                    torch._dynamo.mark_static_address(tensor)
        return self._kept[key]

    def _speculate(
        self,
        out: Tensor,
        length: int,
        positions: Tensor | range,
        cache: KVCache,
        draft_cache: KVCache,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> None:
        """Fill ``out`` [B, N] after its first code by drafting and verifying.

        Code j of ``out`` sits at position length + j. Both caches hold the prompt; the newest
        code is in neither. Stale entries past a rejected draft are overwritten before any
        position reads them (a cache reads only the positions written so far).
        """
        codes, wanted = self.model.config.codes, out.shape[1]
        done, draft_end = 1, length  # codes in out; positions the draft's cache holds
        while done < wanted:
            k = min(self.draft_tokens, wanted - done - 1)
            newest = length + done - 1
            # The draft reads what it has not read yet (one code, or two after a pass that kept
            # every draft) and proposes up to k codes, one per step.
            pending = out[:, draft_end - length : done]
            drafted, draft_logits = [], []
            while len(drafted) < k:
                draft_logits.append(self._draft_logits(pending, draft_cache, positions, draft_end))
                draft_end += pending.shape[1]
                pending = next_token(draft_logits[-1], sampling, generator)[:, None]
                drafted.append(pending)
                if self._unlikely(draft_logits[-1], pending, sampling):
                    break
            k = len(drafted)
            drafted = torch.cat([out[:, done - 1 : done], *drafted], dim=1)
            target_logits = self._run_step(self.step, drafted, cache, positions[newest])
            n, following = accept_drafts(
                target_logits[..., :codes],
                torch.stack(draft_logits, 1) if k else target_logits[:, :0, :codes],
                drafted[:, 1:],
                sampling,
                generator,
            )
            out[:, done : done + n] = drafted[:, 1 : n + 1]
            out[:, done + n] = following
            done += n + 1
            draft_end = min(draft_end, newest + n + 1)  # the draft's codes that were kept
            self.stats.passes += 1
            self.stats.drafted += k
            self.stats.accepted += n

    def _unlikely(self, logits: Tensor, drafted: Tensor, sampling: SamplingConfig) -> bool:
        """Whether any row's drafted code [B, 1] had a probability below the threshold under
        the draft's ``logits`` [B, codes] (greedy: the softmax at temperature 1)."""
        if self.draft_threshold == 0:
            return False
        greedy = sampling.temperature == 0
        probs = logits.float().softmax(-1) if greedy else probabilities(logits, sampling)
        return bool((probs.gather(-1, drafted) < self.draft_threshold).any())

    def _draft_logits(
        self, ids: Tensor, cache: KVCache, positions: Tensor | range, start: int
    ) -> Tensor:
        """The draft's logits [B, codes] after reading ``ids`` [B, n] at positions start..; a
        static draft step reads one code per call."""
        codes = self.model.config.codes
        if not self.static:
            return self.draft_decoder(ids, cache=cache, start=start)[:, -1, :codes]
        for j in range(ids.shape[1]):
            # Codes read from `out` come strided: a compiled step would compile again for them.
            code = ids[:, j : j + 1].clone(memory_format=torch.contiguous_format)
            logits = self._run_step(self.draft_step, code, cache, positions[start + j])
        return logits[:, -1, :codes]


def generate(
    model: VisualLM,
    prompt: Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    decode_dtype: torch.dtype | None = None,
) -> Tensor:
    """One-off `Generator(model, decode_dtype)(prompt, max_new_tokens, sampling)`.

    Reuse a `Generator` when calling repeatedly with a ``decode_dtype``: it keeps the copy.
    """
    return Generator(model, decode_dtype)(prompt, max_new_tokens, sampling)
