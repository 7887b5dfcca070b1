import pytest
import torch

from delvm.errors import DelvmError
from delvm.model.checkpoint import load_model, save_model
from delvm.model.transformer import ModelConfig, VisualLM, count_parameters, preset


@pytest.mark.parametrize(
    ("name", "embedding", "blocks", "total"),
    [
        # DESIGN.md, Table 7: blocks / with a learned 8192 embedding and untied head.
        ("1b", "learned", 1.113e9, 1.147e9),
        ("300m", "learned", 274e6, 291e6),
        # ViT-style 80m: 85M in the blocks, 91M with the head (codebook embedding: +49k).
        ("80m", "codebook", 85e6, 91e6),
    ],
)
def test_preset_parameter_counts(name, embedding, blocks, total):
    with torch.device("meta"):
        model = VisualLM(preset(name, embedding=embedding))
    counts = count_parameters(model)
    assert counts["blocks"] == pytest.approx(blocks, rel=5e-3)
    assert counts["total"] == pytest.approx(total, rel=5e-3)


def test_swiglu_80m_shape_would_be_113m():
    with torch.device("meta"):
        model = VisualLM(preset("80m", block="llama"))
    assert count_parameters(model)["blocks"] == pytest.approx(113e6, rel=5e-3)


@pytest.mark.parametrize("name", ["tiny", "tiny-vit"])
@pytest.mark.parametrize("embedding", ["codebook", "learned"])
def test_forward_shapes_and_causality(name, embedding):
    torch.manual_seed(0)
    model = VisualLM(preset(name, embedding=embedding)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    logits = model(ids)
    assert logits.shape == (2, 40, model.config.vocab_size)
    # Changing a later token must not change earlier logits.
    changed = ids.clone()
    changed[:, 30] = (changed[:, 30] + 1) % model.config.vocab_size
    assert torch.equal(model(changed)[:, :30], logits[:, :30])
    assert not torch.allclose(model(changed)[:, 30:], logits[:, 30:])


def test_codebook_embedding_is_frozen_and_used():
    config = preset("tiny")
    codebook = torch.randn(config.vocab_size, config.codebook_dim)
    model = VisualLM(config, codebook=codebook)
    assert torch.equal(model.embed.codebook, codebook)
    assert "embed.codebook" not in dict(model.named_parameters())
    ids = torch.tensor([[3, 7]])
    expected = codebook[ids] @ model.embed.proj.weight.T
    assert torch.allclose(model.embed(ids), expected, atol=1e-6)
    with pytest.raises(DelvmError, match="codebook has shape"):
        model.set_codebook(torch.zeros(10, config.codebook_dim))


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    config = preset("tiny", hidden_size=256, intermediate_size=512, num_layers=8)
    model = VisualLM(config)
    residual = model.blocks[0].attn.out.weight.std().item()
    plain = model.blocks[0].attn.qkv.weight.std().item()
    assert plain == pytest.approx(0.02, rel=0.05)
    assert residual == pytest.approx(0.02 / 4, rel=0.05)


def test_config_validation():
    with pytest.raises(DelvmError, match="block"):
        ModelConfig(block="mamba")
    with pytest.raises(DelvmError, match="heads"):
        ModelConfig(hidden_size=100, num_heads=3)
    with pytest.raises(DelvmError, match="unknown model config fields"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(DelvmError, match="unknown model preset"):
        preset("7b")


def test_too_long_sequence_is_an_error():
    model = VisualLM(preset("tiny", max_seq_len=16))
    with pytest.raises(DelvmError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("name", ["tiny", "tiny-vit"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = VisualLM(preset(name)).eval()
    save_model(model, tmp_path / "ckpt", tokenizer_fingerprint="abc123")
    loaded = load_model(tmp_path / "ckpt").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    assert torch.equal(model(ids), loaded(ids))
    assert not list(tmp_path.glob("ckpt/.*tmp*")), "temporary files left behind"


def test_checkpoint_bad_input(tmp_path):
    model = VisualLM(preset("tiny"))
    folder = save_model(model, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DelvmError, match="model.safetensors"):
        load_model(folder)
    save_model(VisualLM(preset("tiny", num_layers=3)), tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(DelvmError, match="do not match the config"):
        load_model(tmp_path / "other")
    with pytest.raises(DelvmError, match="no such checkpoint or run folder"):
        load_model(tmp_path / "missing")
