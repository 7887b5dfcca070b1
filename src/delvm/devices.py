"""Where delvm runs and in which number format: `--device`, `--dtype` and native bf16.

Every verb that runs a model takes ``--device`` (default ``auto``: this rank's CUDA GPU when
there is one, else the CPU); inference verbs also take ``--dtype`` (default ``auto``: bf16 on a GPU,
fp32 on a CPU). Training picks its own ``precision`` (`delvm.train.precision`) from
`bf16_is_native`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from delvm.errors import DelvmError

DEVICE_HELP = "auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ..."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The verbs that generate also decode with int8 weights on a CPU (`delvm.inference.quantize`).
GENERATING_DTYPES = ("auto", *DTYPES, "int8")
# /proc/cpuinfo flags of the CPU units that run bf16 matmuls natively (Intel AMX tiles since
# Sapphire Rapids; AVX512-BF16 on Cooper Lake, AMD Zen 4 and later). Without them bf16 is emulated.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """A ``--device`` value as a device: ``auto`` is this rank's GPU (LOCAL_RANK under torchrun)
    when CUDA is available, else the CPU."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DelvmError(f"--device {name!r}: not a device; use {DEVICE_HELP}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DelvmError(
            f"--device {name}: this torch sees no CUDA GPU; use --device cpu, or install a CUDA "
            "build of torch before delvm"
        )
    return device


def cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` (e.g. ``flags``, ``model name``) in /proc/cpuinfo: ``""`` if
    the field is absent, None where the file cannot be read (e.g. on macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (torch's own checks where that file
    does not exist, e.g. on macOS)."""
    flags = cpuinfo_field("flags")
    if flags is not None:
        return set(flags.split())
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return {flag for flag, check in checks.items() if getattr(torch.cpu, check, lambda: False)()}


def native_bf16_units(flags: Iterable[str] | None = None) -> list[str]:
    """Which of `NATIVE_BF16_FLAGS` a CPU has (``flags``: its flag names; default: this CPU's)."""
    flags = set(cpu_flags() if flags is None else flags)
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def bf16_is_native(device: torch.device, flags: Iterable[str] | None = None) -> bool:
    """Whether bf16 matmuls run natively on ``device``: a GPU with bf16 (Ampere and later), or a
    CPU with AMX or AVX512-BF16 (``flags`` as in `native_bf16_units`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(native_bf16_units(flags))


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """A ``--dtype`` value as a dtype: ``auto`` is bf16 on a GPU (fp16 on one without bf16) and
    fp32 on a CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if bf16_is_native(device) else torch.float16
    return torch.float32


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_dtype_argument(
    parser: argparse.ArgumentParser, choices: Iterable[str] = ("auto", *DTYPES)
) -> None:
    choices = list(choices)
    text = "number format of the weights and activations; auto: bf16 on a GPU, fp32 on a CPU"
    if "int8" in choices:
        text += " (decoding with bf16 copies); int8: CPU only, fp32 prefill, int8 weight decoding"
    parser.add_argument("--dtype", choices=choices, default="auto", help=text)
