"""Training precision: fp32, or bf16 autocast (fp32 weights and optimizer state, bf16 matmuls).

``auto`` is bf16 where bf16 matmuls run natively (`delvm.devices.bf16_is_native`): GPUs with
bf16, and CPUs with AMX tiles or AVX512-BF16. Elsewhere it is fp32: a CPU without those units
emulates bf16, slower than fp32, so asking for bf16 there gets a warning rather than a silently
slow run. ``python benchmarks/precision_cpu.py`` times both on the machine at hand.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from delvm.devices import NATIVE_BF16_FLAGS, bf16_is_native

PRECISIONS = ("auto", "fp32", "bf16")


def trains_in_bf16(
    precision: str, device: torch.device, cpu_flags: Iterable[str] | None = None
) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device`` (``cpu_flags``: the CPU's
    /proc/cpuinfo flags; default: this CPU's)."""
    if precision == "auto":
        return bf16_is_native(device, cpu_flags)
    return precision == "bf16"


def training_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context a trainer runs its forward passes in."""
    bf16 = trains_in_bf16(precision, device)
    if bf16 and device.type == "cpu" and not bf16_is_native(device):
        warnings.warn(
            f"precision bf16 on a CPU without bf16 matmul units (neither of "
            f"{', '.join(NATIVE_BF16_FLAGS)} among its flags): bf16 is emulated here and runs "
            "slower than fp32; set precision = fp32 or auto",
            stacklevel=2,
        )
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16)
