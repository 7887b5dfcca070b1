"""A tiny random tokenizer and model for tests that prompt end to end (fast on one CPU core)."""

import torch

from delvm.model import VisualLM, preset
from delvm.tokenizer import VQGAN, VQGANConfig

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


def tiny_tokenizer_and_model(images: int = 6) -> tuple[VQGAN, VisualLM]:
    """Seeded; the model's context holds `images` images (2 pairs, a query and its answer)."""
    torch.manual_seed(0)
    tokenizer = VQGAN(TINY_VQGAN).eval()
    config = preset("tiny", vocab_size=64, codebook_dim=8, max_seq_len=256 * images)
    return tokenizer, VisualLM(config, codebook=tokenizer.codebook.detach()).eval()
