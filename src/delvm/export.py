"""Hand checkpoints to the Hugging Face ecosystem and back.

``export_hf`` writes a standard ``LlamaForCausalLM`` folder (config.json + model.safetensors) that
``transformers`` — and engines reading its format — load as is. DeLVM's codebook embedding is
folded into one ``embed_tokens`` table (codebook @ projection), so the exported model computes
the same logits. No bos/eos/pad ids are set: every id is a VQ code.

``import_hf`` reads such a folder back into a delvm checkpoint (learned embedding). Only weights
and config.json are read; no code shipped with a folder is ever imported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from delvm.checkpoint import (
    atomic_write,
    load_model,
    load_state_strict,
    read_json,
    save_model,
    write_json,
)
from delvm.errors import DelvmError
from delvm.model import ModelConfig, VisualLM

HF_WEIGHTS = "model.safetensors"


def _hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "initializer_range": config.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def to_hf_state(model: VisualLM) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face Llama names (fused q/k/v and gate/up split apart)."""
    config = model.config
    if config.block != "llama":
        raise DelvmError(
            "only llama-block checkpoints export to LlamaForCausalLM; this one uses the ViT-style "
            "block (LayerNorm + GELU MLP), which has no Hugging Face Llama equivalent"
        )
    with torch.no_grad():
        embed = model.embed.table() if config.embedding == "codebook" else model.embed.weight
        state = {
            "model.embed_tokens.weight": embed,
            "model.norm.weight": model.norm.weight,
            "lm_head.weight": model.head.weight,
        }
        for i, block in enumerate(model.blocks):
            prefix = f"model.layers.{i}."
            state[prefix + "input_layernorm.weight"] = block.attn_norm.weight
            state[prefix + "post_attention_layernorm.weight"] = block.mlp_norm.weight
            for name, part in zip(("q", "k", "v"), block.attn.qkv.weight.chunk(3), strict=True):
                state[prefix + f"self_attn.{name}_proj.weight"] = part
            state[prefix + "self_attn.o_proj.weight"] = block.attn.out.weight
            if config.attention_bias:
                for name, part in zip(("q", "k", "v"), block.attn.qkv.bias.chunk(3), strict=True):
                    state[prefix + f"self_attn.{name}_proj.bias"] = part
                state[prefix + "self_attn.o_proj.bias"] = block.attn.out.bias
            gate, up = block.mlp.gate_up.weight.chunk(2)
            state[prefix + "mlp.gate_proj.weight"] = gate
            state[prefix + "mlp.up_proj.weight"] = up
            state[prefix + "mlp.down_proj.weight"] = block.mlp.down.weight
    return state


def from_hf_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Llama names -> our names (q/k/v and gate/up fused). Pops what it uses."""
    ours = {
        "embed.weight": state.pop("model.embed_tokens.weight"),
        "norm.weight": state.pop("model.norm.weight"),
    }
    # A tied checkpoint has no lm_head: the head is the embedding.
    ours["head.weight"] = state.pop("lm_head.weight", ours["embed.weight"]).clone()
    for i in range(config.num_layers):
        hf, me = f"model.layers.{i}.", f"blocks.{i}."
        ours[me + "attn_norm.weight"] = state.pop(hf + "input_layernorm.weight")
        ours[me + "mlp_norm.weight"] = state.pop(hf + "post_attention_layernorm.weight")
        qkv = [state.pop(hf + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
        ours[me + "attn.qkv.weight"] = torch.cat(qkv)
        ours[me + "attn.out.weight"] = state.pop(hf + "self_attn.o_proj.weight")
        if config.attention_bias:
            biases = [state.pop(hf + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")]
            ours[me + "attn.qkv.bias"] = torch.cat(biases)
            ours[me + "attn.out.bias"] = state.pop(hf + "self_attn.o_proj.bias")
        gate_up = [state.pop(hf + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
        ours[me + "mlp.gate_up.weight"] = torch.cat(gate_up)
        ours[me + "mlp.down.weight"] = state.pop(hf + "mlp.down_proj.weight")
    return ours


def export_hf(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the delvm checkpoint as a Hugging Face ``LlamaForCausalLM`` folder."""
    model = load_model(checkpoint)
    state = {k: v.to(dtype).contiguous() for k, v in to_hf_state(model).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / HF_WEIGHTS, lambda tmp: save_file(state, str(tmp), {"format": "pt"}))
    write_json(out / "config.json", _hf_config(model.config, dtype))
    write_json(
        out / "generation_config.json",
        {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
    )
    return out


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, a sharded index, or a .bin.

    ``.bin`` files are read with ``weights_only=True``: a pickle that holds code is refused.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in read_json(index)["weight_map"].values()})
    elif (folder / HF_WEIGHTS).is_file():
        files = [folder / HF_WEIGHTS]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise DelvmError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise DelvmError(f"{path}: unreadable weights file ({err})") from None
    return state


def config_from_hf(hf: dict, source: Path) -> ModelConfig:
    """Our config for a standard Hugging Face Llama config.json; unsupported variants are errors."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise DelvmError(f"{source}: model_type {model_type!r} is not supported (expected 'llama')")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise DelvmError(
            f"{source}: grouped-query attention (num_key_value_heads) is not supported"
        )
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
        raise DelvmError(f"{source}: only the SwiGLU (silu, no MLP bias) Llama MLP is supported")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise DelvmError(f"{source}: rope scaling is not supported")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise DelvmError(f"{source}: head_dim * heads != hidden_size is not supported")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_heads=heads,
        num_layers=hf["num_hidden_layers"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        block="llama",
        embedding="learned",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        attention_bias=bool(hf.get("attention_bias", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def import_hf(source: str | Path, out: str | Path) -> Path:
    """Convert a Hugging Face Llama folder into a delvm checkpoint folder."""
    source = Path(source)
    if not source.is_dir():
        raise DelvmError(f"{source}: no such folder")
    config = config_from_hf(read_json(source / "config.json"), source / "config.json")
    state = read_hf_weights(source)
    try:
        ours = from_hf_state(config, state)
    except KeyError as err:
        raise DelvmError(f"{source}: weight {err} missing for this config") from None
    # Rotary inverse frequencies are derived buffers some writers keep; anything else is unknown.
    leftover = sorted(k for k in state if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise DelvmError(f"{source}: unexpected weights {leftover[:5]} (is this a plain Llama?)")
    with torch.device("meta"):
        model = VisualLM(config)
    load_state_strict(model, {k: v.float() for k, v in ours.items()}, source)
    return save_model(model, out)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face LlamaForCausalLM")
    p.add_argument("checkpoint", type=Path, help="delvm checkpoint folder")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=lambda a: print(export_hf(a.checkpoint, a.out, getattr(torch, a.dtype))))

    p = sub.add_parser("import-hf", help="convert a Hugging Face Llama folder to a checkpoint")
    p.add_argument("source", type=Path, help="Hugging Face model folder")
    p.add_argument("out", type=Path, help="output delvm checkpoint folder")
    p.set_defaults(func=lambda a: print(import_hf(a.source, a.out)))
