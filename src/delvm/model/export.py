"""`delvm export-hf` and `delvm import-hf`: hand checkpoints to Hugging Face and back.

``export_hf`` writes a standard ``LlamaForCausalLM`` folder (config.json + model.safetensors) that
``transformers`` — and engines reading its format — load as is, computing the same logits. No
bos/eos/pad ids are set: every id is a VQ code. ``import_hf`` turns a Hugging Face ``llama`` or
``internlm`` folder (LVM's and DeLVM's releases) into a delvm checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from delvm.fileio import atomic_write, write_json
from delvm.model.checkpoint import load_model, save_model
from delvm.model.hf import hf_config, load_hf_model, to_hf_state


def export_hf(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a checkpoint (delvm or Hugging Face folder) as a ``LlamaForCausalLM`` folder."""
    model = load_model(checkpoint)
    state = {k: v.to(dtype).contiguous() for k, v in to_hf_state(model).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "model.safetensors", lambda tmp: save_file(state, str(tmp), {"format": "pt"})
    )
    write_json(out / "config.json", hf_config(model.config, dtype))
    write_json(
        out / "generation_config.json",
        {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
    )
    return out


def import_hf(source: str | Path, out: str | Path, num_codes: int | None = None) -> Path:
    """Convert a Hugging Face ``llama`` / ``internlm`` folder into a delvm checkpoint folder."""
    return save_model(load_hf_model(source, num_codes), out)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face LlamaForCausalLM")
    p.add_argument("checkpoint", type=Path, help="delvm checkpoint folder")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=lambda a: print(export_hf(a.checkpoint, a.out, getattr(torch, a.dtype))))

    p = sub.add_parser(
        "import-hf", help="convert a Hugging Face llama / internlm folder to a checkpoint"
    )
    p.add_argument("source", type=Path, help="Hugging Face model folder (LVM, DeLVM, exports)")
    p.add_argument("out", type=Path, help="output delvm checkpoint folder")
    p.add_argument(
        "--num-codes",
        type=int,
        default=None,
        help="ids that are VQ codes if the vocabulary is larger (default: all; 8192 for LVM's 8292)",
    )
    p.set_defaults(func=lambda a: print(import_hf(a.source, a.out, a.num_codes)))
