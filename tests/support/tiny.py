"""A tiny random tokenizer and model for tests that prompt end to end (fast on one CPU core)."""

import torch

from delvm.model.transformer import VisualLM, preset
from delvm.tokenizer import VQGAN, VQGANConfig
from delvm.tokenizer import preset as tokenizer_preset

TINY_VQGAN = VQGANConfig(
    resolution=32,
    hidden_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    no_attn_mid_block=True,
    z_channels=8,
    num_embeddings=64,
    quantized_embed_dim=8,
)  # fmt: skip  -> 16 x 16 tokens per 32 px image


def tiny_tokenizer_and_model(
    images: int = 6, prompt_sensitive: bool = False
) -> tuple[VQGAN, VisualLM]:
    """Seeded; the model's context holds `images` images (2 pairs, a query and its answer).

    At the seeded init the model's greedy answer is the same whatever the prompt; with
    `prompt_sensitive` its matrices are scaled x4, and the answer changes with the prompt."""
    torch.manual_seed(0)
    tokenizer = VQGAN(TINY_VQGAN).eval()
    config = preset("tiny", vocab_size=64, codebook_dim=8, max_seq_len=256 * images)
    model = VisualLM(config, codebook=tokenizer.codebook.detach()).eval()
    if prompt_sensitive:
        with torch.no_grad():
            for weight in model.parameters():
                if weight.dim() == 2:
                    weight.mul_(4.0)
    return tokenizer, model


def untrained_cpu_tokenizer(**overrides) -> VQGAN:
    """The demo's CPU tokenizer shape, seeded and untrained, with `overrides` of its fields.

    It keeps GroupNorm: an untrained norm-free net (the preset's own setting) maps every patch to
    one code, which would leave nothing for a test to tell apart.
    """
    torch.manual_seed(0)
    return VQGAN(tokenizer_preset("cpu-64-f8-1024", norm="group", **overrides)).eval()
