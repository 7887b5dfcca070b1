"""Autoregressive generation with a preallocated KV cache: one prefill, then one token per step.

Visual prompting calls this to produce an answer image: e.g. 256 new tokens after a 1792-token
prompt (three example pairs and a query). Every code is a valid token, so generation never stops
early; it always produces exactly ``max_new_tokens``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from delvm.errors import DelvmError
from delvm.model.transformer import VisualLM


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
    """Set logits outside the top-k / nucleus (top-p) sets to -inf. logits: [B, V]."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a code when the codes ranked above it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> Tensor:
    """Choose one code per row from last-position logits [B, V] -> [B]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = _filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """Generates continuations with a model, optionally decoding with reduced-precision weights.

    Decoding one token at a time is bound by reading every weight once per step, so on CPU a bf16
    copy of the weights (``decode_dtype=torch.bfloat16``) decodes faster. The prompt is still
    prefilled by the model as given (large fp32 matmuls are much faster than bf16 ones on CPUs
    without bf16 units), and the KV cache stays in the model's dtype. With ``decode_dtype=None``
    every step runs in the model's own precision (what the parity tests check).
    """

    def __init__(self, model: VisualLM, decode_dtype: torch.dtype | None = None):
        self.model = model
        self.decoder = model
        if decode_dtype is not None and decode_dtype != model.head.weight.dtype:
            self.decoder = copy.deepcopy(model).to(decode_dtype)

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
        if total > model.config.max_seq_len:
            raise DelvmError(
                f"prompt ({length}) + new tokens ({max_new_tokens}) exceed the model's "
                f"max_seq_len {model.config.max_seq_len}"
            )
        device = model.head.weight.device
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)

        cache = model.new_cache(batch, total)
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        logits = model(prompt.to(device), cache=cache, start=0, last_only=True)
        for step in range(max_new_tokens):
            token = next_token(logits[:, -1, :codes], sampling, generator)
            out[:, step] = token
            if step + 1 < max_new_tokens:
                logits = self.decoder(token[:, None], cache=cache, start=length + step)
        return out


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
