"""`--device auto`, `--dtype auto` and `precision = "auto"` decide as a GPU or CPU user expects."""

from pathlib import Path

import pytest
import torch

from delvm import devices
from delvm.cli import build_parser
from delvm.errors import DelvmError
from delvm.train.precision import trains_in_bf16

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)

# /proc/cpuinfo flag sets of real CPU families (abridged to the flags that matter).
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
ICE_LAKE = {"avx2", "avx512f", "avx512_vnni"}
HASWELL = {"avx2", "fma"}


@pytest.mark.parametrize(
    ("flags", "native"),
    [(SAPPHIRE_RAPIDS, ["amx_bf16", "avx512_bf16"]), (ZEN4, ["avx512_bf16"]),
     (ICE_LAKE, []), (HASWELL, []), (set(), [])],
)  # fmt: skip
def test_training_precision_auto_is_bf16_only_with_native_bf16_units(flags, native):
    assert devices.native_bf16_units(flags) == native
    assert trains_in_bf16("auto", CPU, flags) == bool(native)
    assert trains_in_bf16("bf16", CPU, flags) and not trains_in_bf16("fp32", CPU, flags)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo (not Linux)")
def test_this_cpus_flags_come_from_proc_cpuinfo():
    flags = devices.cpu_flags()
    with open("/proc/cpuinfo") as f:
        line = next(x for x in f if x.startswith("flags"))
    assert flags == set(line.split(":", 1)[1].split())


def test_on_a_gpu_auto_trains_and_infers_in_bf16_where_it_has_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert trains_in_bf16("auto", GPU) and devices.inference_dtype("auto", GPU) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert not trains_in_bf16("auto", GPU)  # e.g. a V100: fp32 training, fp16 inference
    assert devices.inference_dtype("auto", GPU) == torch.float16


def test_inference_dtype_auto_is_fp32_on_a_cpu_and_explicit_names_win():
    assert devices.inference_dtype("auto", CPU) == torch.float32
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        assert devices.inference_dtype(name, CPU) == dtype
        assert devices.inference_dtype(name, GPU) == dtype


def test_device_auto_is_this_ranks_gpu_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == CPU
    assert devices.resolve_device("cpu") == CPU
    with pytest.raises(DelvmError, match="sees no CUDA GPU.*--device cpu"):
        devices.resolve_device("cuda:1")
    with pytest.raises(DelvmError, match="'gpu0': not a device"):
        devices.resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")  # as torchrun sets it
    assert devices.resolve_device("auto") == torch.device("cuda", 3)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)


VERBS_WITH_DEVICE = [
    ["prompt", "ckpt", "--examples", "a", "b", "--query", "q", "--out", "o"],
    ["inpaint", "ckpt", "img", "--out", "o"],
    ["next-frame", "ckpt", "f1", "f2", "--out", "o"],
    ["eval", "ckpt"],
    ["serve", "ckpt"],
    ["tokenizer", "encode", "src", "out", "--tokenizer", "tok"],
    ["tokenizer", "decode", "src", "out", "--tokenizer", "tok"],
    ["tokenizer", "reconstruct", "src", "out", "--tokenizer", "tok"],
    ["data", "build", "build.toml"],
    ["data", "inspect", "store"],
]
VERBS_WITH_DTYPE = [v for v in VERBS_WITH_DEVICE if v[0] != "data"] + [["classify", "eval", "run"]]


def test_every_verb_defaults_to_device_auto_and_dtype_auto():
    parser = build_parser()
    for argv in VERBS_WITH_DEVICE:
        assert parser.parse_args(argv).device == "auto", argv
    for argv in VERBS_WITH_DTYPE:
        assert parser.parse_args(argv).dtype == "auto", argv
        assert parser.parse_args([*argv, "--dtype", "bf16"]).dtype == "bf16", argv


def test_dtype_int8_is_a_choice_of_the_verbs_that_generate_only():
    parser = build_parser()
    generating = [
        v for v in VERBS_WITH_DTYPE if v[0] in ("prompt", "inpaint", "next-frame", "serve")
    ]
    for argv in [*generating, ["eval-pascal5i", "ckpt", "--voc", "voc"]]:
        assert parser.parse_args([*argv, "--dtype", "int8"]).dtype == "int8", argv
    for argv in (["eval", "ckpt"], ["tokenizer", "encode", "src", "out", "--tokenizer", "tok"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--dtype", "int8"])
