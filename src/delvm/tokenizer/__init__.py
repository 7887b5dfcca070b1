"""The VQGAN image tokenizer: images <-> grids of discrete codes (see `vqgan`)."""

from delvm.tokenizer.presets import PRESETS, preset
from delvm.tokenizer.vqgan import VQGAN, VQGANConfig, load_tokenizer

__all__ = ["PRESETS", "VQGAN", "VQGANConfig", "load_tokenizer", "preset"]
