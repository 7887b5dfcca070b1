"""The visual-sentence model: a causal transformer over VQ codes, readable in one sitting.

Two block types share one skeleton:

- ``llama``: pre-norm RMSNorm, rotary attention, SwiGLU MLP, no biases (LVM, DeLVM 300M / 1B);
- ``vit``: pre-norm LayerNorm, rotary attention, 2-matrix GELU MLP, with biases (DeLVM's 80M and
  its "ViT-style" causal block).

Token ids are raw VQ codes ``0..V-1``. They are embedded either DeLVM's way (``codebook``: the
tokenizer's frozen V x D codebook, then a learnable ``Linear(D, hidden, bias=False)``) or LVM's way
(``learned``: a plain V x hidden table). The output head is a separate, untied ``Linear(hidden, V)``.

Initialisation (``VisualLM._init_weights``): every Linear and the learned embedding draw from
N(0, init_std); the two projections that write into the residual stream (attention output and
MLP down / fc2) use N(0, init_std / sqrt(2 * num_layers)) so the residual variance does not grow
with depth (GPT-2); biases start at 0 and norm gains at 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from delvm.errors import DelvmError

BLOCK_TYPES = ("llama", "vit")
EMBEDDING_TYPES = ("codebook", "learned")


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # rows of the embedding and the head
    # Ids that are VQ codes (0..num_codes-1); None means all of vocab_size. LVM's release has
    # 8292 rows for 8192 codes: the extra 100 ids are never generated.
    num_codes: int | None = None
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    max_seq_len: int = 2048  # 4 pairs of 256-token images
    block: str = "llama"  # "llama" | "vit"
    embedding: str = "codebook"  # "codebook" (DeLVM) | "learned" (LVM)
    codebook_dim: int = 64  # D of the tokenizer's codebook (codebook embedding only)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6  # RMSNorm eps (llama) or LayerNorm eps (vit)
    attention_bias: bool = False  # biases on q/k/v/o for the llama block (vit always has them)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.block not in BLOCK_TYPES:
            raise DelvmError(f"model block {self.block!r} is not one of {BLOCK_TYPES}")
        if self.embedding not in EMBEDDING_TYPES:
            raise DelvmError(f"model embedding {self.embedding!r} is not one of {EMBEDDING_TYPES}")
        if self.num_codes is not None and not 0 < self.num_codes <= self.vocab_size:
            raise DelvmError(f"num_codes {self.num_codes} must lie in 1..vocab_size")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise DelvmError(
                f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def codes(self) -> int:
        """How many ids are VQ codes: prompts and generated ids lie in 0..codes-1."""
        return self.num_codes or self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DelvmError(
                f"unknown model config fields {unknown}; known fields: {sorted(known)}"
            )
        return cls(**values)


# The paper's sizes (DESIGN.md, Table 7) and tiny ones for tests. The 80m model uses the ViT-style
# block; a SwiGLU MLP at that shape would have 113M parameters in the blocks.
PRESETS: dict[str, ModelConfig] = {
    "1b": ModelConfig(hidden_size=2048, intermediate_size=5504, num_heads=16, num_layers=22),
    "300m": ModelConfig(hidden_size=1024, intermediate_size=2688, num_heads=8, num_layers=22),
    "80m": ModelConfig(
        hidden_size=768, intermediate_size=3072, num_heads=12, num_layers=12, block="vit"
    ),
    # The published checkpoints' shapes (delvm.model.hf reads their folders): DeLVM's InternLM-format
    # releases (q/k/v/o biases, SwiGLU width 8/3 * hidden rounded up to 256, learned embedding)
    # and LVM's 7B (LLaMA-7B shape, 8292 ids of which 8192 are VQ codes, 4096 context).
    "delvm-300m-hf": ModelConfig(
        hidden_size=1024, intermediate_size=2816, num_heads=8, num_layers=22,
        attention_bias=True, embedding="learned",
    ),
    "delvm-1b-hf": ModelConfig(
        hidden_size=2048, intermediate_size=5632, num_heads=16, num_layers=22,
        attention_bias=True, embedding="learned",
    ),
    "lvm-7b": ModelConfig(
        vocab_size=8292, num_codes=8192, hidden_size=4096, intermediate_size=11008,
        num_heads=32, num_layers=32, max_seq_len=4096, embedding="learned",
    ),
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_heads=4, num_layers=2,
        max_seq_len=256, codebook_dim=16,
    ),
    "tiny-vit": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=256, num_heads=4, num_layers=2,
        max_seq_len=256, codebook_dim=16, block="vit",
    ),
}  # fmt: skip


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of a named preset with fields overridden, e.g. ``preset("tiny", vocab_size=1024)``."""
    if name not in PRESETS:
        raise DelvmError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name].to_dict(), **overrides})


# --------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as LLaMA does) so bf16 activations keep their precision here.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin [length, head_dim] for the half-split rotary layout (as Hugging Face Llama)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, Dh] by position; cos/sin are [T, Dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


def attention_and_lse(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Softmax attention of q [..., T, Dh] over k, v [..., S, Dh] (``mask`` [T, S]: True where a
    query may look) and the log-sum-exp of its scores [..., T, 1], in fp32: attention over
    disjoint sets of keys merges exactly by it. (Scores of bf16 inputs are computed in fp32, as
    flash attention keeps them.)"""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    return (scores - lse).exp().to(v.dtype) @ v, lse


class KVCache:
    """Preallocated keys and values: one [B, heads, max_len, head_dim] tensor each per layer
    (separate tensors, which a compiled step writes in place; it would copy a slice's whole base).

    Its dtype may differ from the weights': on CPU, attention over a long cache is fastest in
    fp32 even when the weights are bf16 (this is what `delvm.inference.generate` uses for decoding).

    A cache over a ``prefix`` (a filled batch-1 cache of the positions every row shares, e.g. a
    prompt's example pairs) stores only the positions after it. Every row reads the prefix's
    keys and values, held once: the rows' queries attend to them as one batch, and that part
    and each row's own merge by their log-sum-exp (a cascade, as in Hydragen or FlashInfer).

    Positions come as an int (the cache returns the keys written so far: each step a new key
    length) or, for a static-shape step, as a 0-dim tensor: then every step writes at that
    tensor position and attends over the whole cache with a mask of the positions so far, so
    one compiled graph (or CUDA graph) serves every step. The cache starts zeroed because such
    a step reads positions not yet written (masked, but 0 x NaN would still be NaN).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        max_len: int,
        dtype,
        device,
        prefix: KVCache | None = None,
    ):
        self.prefix = prefix
        offset = prefix.max_len if prefix is not None else 0
        shape = (batch, config.num_heads, max_len - offset, config.head_dim)
        layers = range(config.num_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.max_len = max_len

    @property
    def offset(self) -> int:
        """Positions the prefix holds: this cache stores position ``offset + j`` at index j.
        (Read from a shape, which a compiled step treats as a size rather than a constant.)"""
        return 0 if self.prefix is None else self.prefix.keys[0].shape[2]

    def update(
        self, layer: int, start: int | Tensor, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Store k, v [B, H, T, Dh] at positions start.. and return this cache's keys/values
        up to them (from position ``offset`` on); all of them if ``start`` is a tensor (a
        static-shape step: its caller checks the positions, a check here would sync a GPU)."""
        if isinstance(start, Tensor):
            index = start - self.offset + torch.arange(k.shape[2], device=k.device)
            keys, values = self.keys[layer], self.values[layer]
            keys[:, :, index] = k.to(keys.dtype)  # index_put does not cast
            values[:, :, index] = v.to(values.dtype)
            return keys, values
        end = start + k.shape[2]
        if end > self.max_len:
            raise DelvmError(f"sequence of {end} tokens exceeds the KV cache of {self.max_len}")
        if start < self.offset:
            raise DelvmError(f"positions below {self.offset} belong to the shared prefix")
        start, end = start - self.offset, end - self.offset
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attend(self, layer: int, start: int | Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store k, v [B, H, T, Dh] at positions start.. and attend q [B, H, T, Dh], the
        queries at those positions, causally to every position so far."""
        keys, values = self.update(layer, start, k, v)
        q = q.to(keys.dtype)
        batch, heads, length, dim = q.shape
        static = isinstance(start, Tensor)  # keys are the whole cache, written or not
        mask = None  # one new query sees every cached position
        if length > 1 or static:  # query i sits at position start + i, key j at offset + j
            rows = torch.arange(length, device=q.device)[:, None] + start - self.offset
            mask = rows >= torch.arange(keys.shape[2], device=q.device)
        if self.prefix is None:
            # The whole prompt at once: the fast causal path.
            causal = not static and length > 1 and start == 0
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=None if causal else mask, is_causal=causal
            )
        own, own_lse = attention_and_lse(q, keys, values, mask)
        stacked = q.transpose(0, 1).reshape(1, heads, batch * length, dim)
        shared, shared_lse = attention_and_lse(
            stacked, self.prefix.keys[layer], self.prefix.values[layer], None
        )
        shared = shared.view(heads, batch, length, dim).transpose(0, 1)
        shared_lse = shared_lse.view(heads, batch, length, 1).transpose(0, 1)
        top = torch.maximum(own_lse, shared_lse)
        own_weight, shared_weight = (own_lse - top).exp(), (shared_lse - top).exp()
        merged = (own * own_weight + shared * shared_weight) / (own_weight + shared_weight)
        return merged.to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, bias: bool):
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        # q, k and v in one matmul: one kernel instead of three, which matters when decoding.
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=bias)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None,
        start: int | Tensor,
        causal: bool = True,
    ) -> Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, Dh]
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            y = cache.attend(self.layer, start, q, k, v)
        return self.out(y.to(x.dtype).transpose(1, 2).reshape(batch, length, hidden))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016) of a residual branch x [B, ...]: in training, each
    sample's branch is dropped with probability ``rate`` and kept ones scaled by 1 / (1 - rate)."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.drop_path = 0.0  # stochastic depth of both branches; only the classifier sets it
        if config.block == "llama":
            self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
            self.attn = Attention(config, layer, bias=config.attention_bias)
            self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
            self.mlp = SwiGLU(config)
        else:
            self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
            self.attn = Attention(config, layer, bias=True)
            self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
            self.mlp = GeluMLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        start: int | Tensor = 0,
        causal: bool = True,
    ) -> Tensor:
        attn = self.attn(self.attn_norm(x), cos, sin, cache, start, causal)
        x = x + drop_path(attn, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.mlp_norm(x)), self.drop_path, self.training)


class CodebookEmbedding(nn.Module):
    """DeLVM's embedding: frozen tokenizer codebook [V, D] -> Linear(D, hidden, bias=False)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # Persistent buffer: the checkpoint carries the codebook it was trained with. Random until
        # `VisualLM.set_codebook` copies the tokenizer's in.
        self.register_buffer("codebook", torch.randn(config.vocab_size, config.codebook_dim))
        self.proj = nn.Linear(config.codebook_dim, config.hidden_size, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(F.embedding(ids, self.codebook))

    def table(self) -> Tensor:
        """The equivalent plain embedding table [V, hidden] (what export writes)."""
        return self.proj(self.codebook)


# --------------------------------------------------------------------------------------------
# The model


class VisualLM(nn.Module):
    def __init__(self, config: ModelConfig, codebook: Tensor | None = None):
        super().__init__()
        self.config = config
        if config.embedding == "codebook":
            self.embed: nn.Module = CodebookEmbedding(config)
        else:
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        if config.block == "llama":
            self.norm: nn.Module = RMSNorm(config.hidden_size, config.norm_eps)
        else:
            self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_rotary()
        self._init_weights()
        if codebook is not None:
            self.set_codebook(codebook)

    def init_rotary(self) -> None:
        """(Re)build the rotary tables: they are derived, so checkpoints do not store them."""
        c = self.config
        cos, sin = rotary_tables(c.head_dim, c.max_seq_len, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("attn.out", "mlp.down", "mlp.fc2"))
                nn.init.normal_(module.weight, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    def set_codebook(self, codebook: Tensor) -> None:
        """Copy the tokenizer's codebook [V, D] into the frozen embedding buffer."""
        if self.config.embedding != "codebook":
            raise DelvmError("set_codebook needs a model with embedding='codebook'")
        expected = (self.config.vocab_size, self.config.codebook_dim)
        if tuple(codebook.shape) != expected:
            raise DelvmError(
                f"tokenizer codebook has shape {tuple(codebook.shape)} but the model expects "
                f"{expected} (vocab_size x codebook_dim); use a model config matching the tokenizer"
            )
        with torch.no_grad():
            self.embed.codebook.copy_(codebook)

    def load_weights(self, state: dict[str, Tensor], source: object) -> None:
        """Load a full state dict strictly (also into a meta-device model); errors name `source`."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise DelvmError(
                f"{source}: weights do not match the config (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); the config must be the one they were saved with"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise DelvmError(
                    f"{source}: {key} has shape {tuple(tensor.shape)}, config expects "
                    f"{tuple(expected[key].shape)}"
                )
        self.load_state_dict(state, strict=True, assign=True)
        self.init_rotary()  # derived tables: rebuilt for real even if built on the meta device

    def hidden_states(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        start: int | Tensor = 0,
        causal: bool = True,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Run the trunk on embeddings x [B, T, hidden] at positions start..start+T-1.

        ``causal=False`` lets every position attend to every other (the classifier's
        bidirectional option); generation always runs causally. ``positions`` [T] (increasing,
        below max_seq_len, without a cache) replaces start..start+T-1: the classifier's patches
        of a 224 px image sit where the codes of a 256 px image did in pretraining (it checks
        them once; here a check would cost a device sync per call). A 0-dim tensor ``start``
        with a cache is a static-shape step (see `KVCache`): its positions are not checked
        either, the caller checks them (`delvm.inference.generate.Generator`).
        """
        if isinstance(start, Tensor):
            positions = start + torch.arange(x.shape[1], device=x.device)
        if positions is None:
            end = start + x.shape[1]
            if end > self.config.max_seq_len:
                raise DelvmError(
                    f"sequence of {end} tokens exceeds max_seq_len {self.config.max_seq_len}"
                )
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for block in self.blocks:
            x = block(x, cos, sin, cache, start, causal)
        return self.norm(x)

    def forward(
        self,
        ids: Tensor,
        cache: KVCache | None = None,
        start: int | Tensor = 0,
        last_only: bool = False,
    ) -> Tensor:
        """Logits [B, T, V] for ids [B, T] (only the last position's, [B, 1, V], if last_only)."""
        h = self.hidden_states(self.embed(ids), cache, start)
        if last_only:
            h = h[:, -1:]
        return self.head(h)

    def new_cache(
        self,
        batch: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        prefix: KVCache | None = None,
    ) -> KVCache:
        """An empty KV cache on this model's device (dtype: the weights' unless given), after a
        ``prefix`` every row shares if given (see `KVCache`)."""
        weight = self.head.weight
        return KVCache(
            self.config,
            batch,
            max_len or self.config.max_seq_len,
            dtype or weight.dtype,
            weight.device,
            prefix,
        )


def count_parameters(model: VisualLM) -> dict[str, int]:
    """Trainable parameters: in the blocks, and in total (embedding + blocks + norm + head)."""
    blocks = sum(p.numel() for p in model.blocks.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"blocks": blocks, "total": total}
