"""The Hugging Face folder formats delvm reads and writes, converted to and from our weights.

Read: standard ``llama`` folders (LVM's release, or our own exports) and DeLVM's released
``internlm`` folders (a LLaMA with biases on q/k/v/o). Only ``config.json`` and the weight files
are read: modelling code shipped beside them (``modeling_*.py``, ``auto_map``) is never imported
or executed. ``.bin`` weights are unpickled with ``weights_only=True`` only.

Written: a standard ``LlamaForCausalLM`` folder (``delvm.model.export``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from delvm.errors import DelvmError
from delvm.fileio import read_json
from delvm.model.transformer import ModelConfig, VisualLM

SUPPORTED_MODEL_TYPES = ("llama", "internlm")
# LVM's release: 8192 VQ codes plus 100 ids its training never used (vocab 8292).
LVM_VOCAB, LVM_CODES = 8292, 8192
# Buffers some writers keep in the state dict: derived from the config, not weights.
DERIVED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_folder(folder: Path) -> bool:
    """A folder whose config.json has a Hugging Face ``model_type``."""
    config = Path(folder) / "config.json"
    return config.is_file() and "model_type" in read_json(config)


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json of a standard ``LlamaForCausalLM`` equal to a llama-block model."""
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


def config_from_hf(hf: dict, source: Path) -> ModelConfig:
    """Our config for a ``llama`` or ``internlm`` config.json; unsupported variants are errors."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DelvmError(
            f"{source}: model_type {model_type!r} is not supported; delvm reads "
            f"{' and '.join(SUPPORTED_MODEL_TYPES)} folders (LVM and DeLVM releases)"
        )
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise DelvmError(f"{source}: grouped-query attention (num_key_value_heads) is unsupported")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
        raise DelvmError(f"{source}: only the SwiGLU (silu, no MLP bias) Llama MLP is supported")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise DelvmError(f"{source}: rope scaling is not supported")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise DelvmError(f"{source}: head_dim * heads != hidden_size is not supported")
    # InternLM names its q/k/v/o bias switch "bias"; Llama "attention_bias".
    bias = hf.get("bias", True) if model_type == "internlm" else hf.get("attention_bias", False)
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
        attention_bias=bool(bias),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def to_hf_state(model: VisualLM) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face Llama names (fused q/k/v and gate/up split apart).

    DeLVM's codebook embedding is folded into one ``embed_tokens`` table (codebook @ projection).
    """
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


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, a sharded index, or a .bin."""
    safetensors_index = folder / "model.safetensors.index.json"
    bin_index = folder / "pytorch_model.bin.index.json"
    if safetensors_index.is_file():
        files = sorted({folder / f for f in read_json(safetensors_index)["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif bin_index.is_file():
        files = sorted({folder / f for f in read_json(bin_index)["weight_map"].values()})
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise DelvmError(f"{folder}: no model.safetensors, pytorch_model.bin or sharded index")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError:
            raise DelvmError(
                f"{path}: unsafe weights file refused (the pickle holds more than tensors, which "
                "weights_only loading never runs); convert it to safetensors where you trust it"
            ) from None
        except (SafetensorError, OSError, RuntimeError) as err:
            raise DelvmError(f"{path}: unreadable weights file ({err})") from None
    return state


def load_hf_model(folder: str | Path, num_codes: int | None = None) -> VisualLM:
    """A Hugging Face ``llama`` / ``internlm`` folder as our model (learned embedding, fp32).

    ``num_codes``: how many ids are VQ codes when the vocabulary is larger (LVM: 8192 of 8292).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DelvmError(f"{folder}: no such folder")
    config = config_from_hf(read_json(folder / "config.json"), folder / "config.json")
    if num_codes is None and config.vocab_size == LVM_VOCAB:
        num_codes = LVM_CODES
    if num_codes is not None:
        config = ModelConfig.from_dict({**config.to_dict(), "num_codes": num_codes})
    state = read_hf_weights(folder)
    try:
        ours = from_hf_state(config, state)
    except KeyError as err:
        raise DelvmError(f"{folder}: weight {err} missing for this config") from None
    leftover = sorted(k for k in state if not k.endswith(DERIVED_BUFFER_SUFFIXES))
    if leftover:
        raise DelvmError(f"{folder}: unexpected weights {leftover[:5]} for a {config.block} model")
    with torch.device("meta"):
        model = VisualLM(config)
    model.load_weights({k: v.float() for k, v in ours.items()}, folder)
    return model
