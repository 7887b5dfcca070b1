"""Training precision: fp32, or bf16 autocast (fp32 weights and optimizer state, bf16 matmuls).

`auto` is bf16 on GPUs and fp32 on CPUs. On a CPU with AMX tiles (Intel Xeon since Sapphire
Rapids) bf16 also pays: on 2 cores the demo's tokenizer step runs about 1.6x and its LVM step
about 1.15x faster than in fp32 (benchmarks/precision_cpu.py). Elsewhere a CPU emulates bf16,
several times slower than fp32, so asking for it there gets a warning rather than a silently slow
run.
"""

from __future__ import annotations

import warnings

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, the units that make bf16 matmuls faster than fp32."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def training_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context a trainer runs its forward passes in."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16 and device.type == "cpu" and not cpu_has_amx():
        warnings.warn(
            "precision bf16 on a CPU without AMX: bf16 is emulated here and runs several times "
            "slower than fp32; set precision = fp32",
            stacklevel=2,
        )
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16)
