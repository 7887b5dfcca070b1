"""The VQGAN: open-muse checkpoint parity, loading/saving, configs, the encode/decode API."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from delvm.errors import DelvmError
from delvm.tokenizer import PRESETS, VQGAN, VQGANConfig, load_tokenizer, preset
from delvm.tokenizer.vqgan import AttnBlock
from tests.support.tiny import TINY_VQGAN as TINY

# Made by open-muse's VQGANModel itself (tests/fixtures/vqgan_muse_parity/README.md).
FIXTURE = Path(__file__).parent / "fixtures" / "vqgan_muse_parity"


def tiny(seed: int = 0, **changes) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(replace(TINY, **changes)).eval()


@pytest.fixture(scope="module")
def parity():
    expected = np.load(FIXTURE / "expected.npz")
    return load_tokenizer(FIXTURE / "checkpoint"), expected


# ---- parity with the reference implementation ----------------------------------------------


def test_fixture_tokens_and_pixels_match_the_reference(parity):
    model, expected = parity
    ids = model.encode(expected["images_uint8"])
    assert ids.shape == (2, 256) and ids.dtype == torch.int64
    assert (ids.numpy() == expected["tokens"]).all()  # all 512 tokens
    decoded = model.decode(expected["tokens"], clamp=False).numpy()
    assert np.abs(decoded - expected["decoded"]).max() < 1e-4
    clamped = model.decode(expected["tokens"])
    assert clamped.min() >= 0 and clamped.max() <= 1


def test_fixture_facts(parity):
    model, _ = parity
    assert model.grid_size == 16 and model.num_codes == 8192
    assert model.codebook.shape == (8192, 64)
    # the fixture is the public shape, narrowed to fit in the repository
    assert model.config == preset("f16-8192", hidden_channels=32, num_res_blocks=1)


def test_bf16_encode_mostly_agrees_with_fp32(parity):
    model, expected = parity
    ids = model.encode(expected["images_uint8"][:1], bf16=True)
    agree = (ids.numpy() == expected["tokens"][:1]).mean()
    assert agree > 0.9, agree  # bf16 rounding moves near-ties only (all agree on this fixture)
    pixels = model.decode(expected["tokens"][:1], bf16=True)
    reference = np.clip(expected["decoded"][:1], 0, 1)
    assert np.abs(pixels.numpy() - reference).mean() < 0.02


def test_input_layouts_give_the_same_tokens(parity):
    model, expected = parity
    hwc = expected["images_uint8"]
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    unit = chw.float() / 255
    reference = model.encode(hwc)
    assert torch.equal(model.encode(chw), reference)
    assert torch.equal(model.encode(unit), reference)


# ---- save / load ----------------------------------------------------------------------------


def test_save_then_load_round_trip(tmp_path):
    model = tiny()
    folder = model.save_pretrained(tmp_path / "tok")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["_class_name"] == "VQGANModel" and meta["channel_mult"] == [1, 2]
    loaded = load_tokenizer(folder)
    assert loaded.config == model.config
    assert loaded.fingerprint() == model.fingerprint()
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(images), model.encode(images))


def test_bin_checkpoints_load_like_safetensors(tmp_path):
    model = tiny()
    folder = model.save_pretrained(tmp_path / "tok")
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert load_tokenizer(folder).fingerprint() == model.fingerprint()


def test_fingerprint_tracks_config_and_weights():
    a, b = tiny(seed=0), tiny(seed=0)
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    with torch.no_grad():
        b.codebook[0, 0] += 1e-3
    assert a.fingerprint() != b.fingerprint()
    c = VQGAN(replace(TINY, commitment_cost=0.5))
    c.load_state_dict(a.state_dict())
    assert c.fingerprint() != a.fingerprint()


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    folder = tiny().save_pretrained(tmp_path / "tok")
    state = tiny().state_dict()
    state["extra.weight"] = state.pop("quant_conv.bias")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(DelvmError) as err:
        load_tokenizer(folder)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "quant_conv.bias" in message
    assert "extra.weight" in message and "\n" not in message


def test_config_weights_shape_mismatch(tmp_path):
    folder = tiny().save_pretrained(tmp_path / "tok")
    meta = json.loads((folder / "config.json").read_text())
    meta["num_embeddings"] = 128
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(DelvmError, match=r"model.safetensors.*quantize.embedding.weight"):
        load_tokenizer(folder)


def test_truncated_and_empty_weights(tmp_path):
    folder = tiny().save_pretrained(tmp_path / "tok")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DelvmError, match="model.safetensors: unreadable or truncated"):
        load_tokenizer(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DelvmError, match="pytorch_model.bin: empty"):
        load_tokenizer(folder)


class _Payload:  # anything that is not a tensor: weights_only must refuse to build it
    pass


def test_pickles_with_code_are_refused(tmp_path):
    folder = tiny().save_pretrained(tmp_path / "tok")
    (folder / "model.safetensors").unlink()
    torch.save({"x": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(DelvmError, match="weights_only=True"):
        load_tokenizer(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(DelvmError, match="nowhere: not a tokenizer folder"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DelvmError, match="file: not a tokenizer folder"):
        load_tokenizer(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DelvmError, match="config.json: missing"):
        load_tokenizer(tmp_path / "empty")
    shutil.copy(FIXTURE / "checkpoint" / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(DelvmError, match="no model.safetensors or pytorch_model.bin"):
        load_tokenizer(tmp_path / "empty")


# ---- configs --------------------------------------------------------------------------------


def test_config_json_defaults_are_open_muse_defaults():
    config = VQGANConfig.from_dict({"_class_name": "VQGANModel", "num_embeddings": 8192})
    assert config.attn_resolutions == (16,) and config.z_channels == 256
    assert config.num_embeddings == 8192


def test_bad_configs_are_one_line_errors():
    with pytest.raises(DelvmError, match="unknown VQGAN setting"):
        VQGANConfig.from_dict({"hidden_channel": 128})
    with pytest.raises(DelvmError, match="multiple of 32"):
        VQGANConfig(hidden_channels=48)
    with pytest.raises(DelvmError, match="not a multiple of the downsampling factor 16"):
        VQGANConfig(resolution=100)
    with pytest.raises(DelvmError, match="not a VQGANModel"):
        VQGANConfig.from_dict({"_class_name": "AutoencoderKL"})
    with pytest.raises(DelvmError, match="unknown tokenizer preset"):
        preset("f32")


def test_norm_free_models_save_their_norm_and_group_ones_stay_open_muse_configs(tmp_path):
    grouped = tiny().save_pretrained(tmp_path / "group")
    assert "norm" not in json.loads((grouped / "config.json").read_text())
    model = tiny(norm="none", hidden_channels=24)  # any width: no groups to divide it
    assert not any("norm" in key for key in model.state_dict())
    folder = model.save_pretrained(tmp_path / "none")
    assert json.loads((folder / "config.json").read_text())["norm"] == "none"
    loaded = load_tokenizer(folder)
    assert loaded.config == model.config and loaded.fingerprint() == model.fingerprint()
    # Weights of a norm-free model are not a GroupNorm model's: strict loading says which.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "norm": "group", "hidden_channels": 32})
    )
    with pytest.raises(DelvmError, match="missing .*norm1"):
        load_tokenizer(folder)
    with pytest.raises(DelvmError, match="norm 'batch'"):
        VQGANConfig(norm="batch")
    (folder / "config.json").write_text(json.dumps({**config, "norm": "batch"}))
    with pytest.raises(DelvmError, match=r"none/config\.json: VQGAN config: norm 'batch'"):
        load_tokenizer(folder)


def test_presets_build_and_have_their_grids():
    assert PRESETS["f16-8192"].grid_size == 16
    assert PRESETS["cpu-64-f8-1024"].grid_size == 8
    with torch.device("meta"):
        big = VQGAN(PRESETS["f16-8192"])
    assert not any(k.startswith("encoder.mid.attn_1") for k in big.state_dict())


# ---- every config field does what open-muse does -------------------------------------------


def _reference_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """open-muse's AttnBlock arithmetic: bmm(q^T, k) * c^-0.5, softmax, bmm(v, w^T)."""
    b, c, h, w = x.shape
    y = block.norm(x)
    q = block.q(y).reshape(b, c, h * w).permute(0, 2, 1)
    k = block.k(y).reshape(b, c, h * w)
    weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    v = block.v(y).reshape(b, c, h * w)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + block.proj_out(out)


def test_attention_blocks_follow_the_reference_formula():
    torch.manual_seed(0)
    block = AttnBlock(32, "group")
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(block(x), _reference_attention(block, x), atol=1e-5, rtol=1e-5)


def test_attention_config_places_blocks_where_open_muse_does():
    model = tiny(attn_resolutions=(16,), no_attn_mid_block=False, num_res_blocks=2)
    keys = model.state_dict().keys()
    assert "encoder.mid.attn_1.q.weight" in keys and "decoder.mid.attn_1.proj_out.bias" in keys
    # resolution 32, f2: encoder level 1 and decoder level 1 work at 16 px
    assert "encoder.down.1.attn.1.k.weight" in keys and "encoder.down.0.attn.0.k.weight" not in keys
    assert "decoder.up.1.attn.2.v.weight" in keys and "decoder.up.0.attn.0.v.weight" not in keys
    ids = model.encode(torch.rand(1, 3, 32, 32))
    assert model.decode(ids).shape == (1, 3, 32, 32)


def test_resampling_without_conv_has_no_resample_weights():
    model = tiny(resample_with_conv=False)
    assert not any("sample" in k for k in model.state_dict())
    x = torch.rand(1, 32, 8, 8)
    assert torch.equal(model.encoder.down[0].downsample(x), F.avg_pool2d(x, 2))
    assert torch.equal(
        model.decoder.up[1].upsample(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    )


def test_downsampling_pads_right_and_bottom_only():
    model = tiny()
    down = model.encoder.down[0].downsample
    x = torch.randn(1, 32, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(x), expected)


def test_quantizer_picks_the_nearest_code():
    model = tiny()
    z = torch.randn(50, 8)
    brute = torch.cdist(z, model.codebook).argmin(1)
    assert torch.equal(model.quantize.nearest(z, chunk=7), brute)


def test_training_forward_losses_and_straight_through():
    model = tiny().train()
    x = torch.rand(2, 3, 32, 32)
    recon, ids, vq_loss, z = model(x)
    assert recon.shape == x.shape and ids.shape == (2, 256) and z.shape == (2, 8, 16, 16)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    e = model.codebook[ids.flatten()].detach()
    expected = (1 + model.config.commitment_cost) * F.mse_loss(flat, e)
    torch.testing.assert_close(vq_loss, expected)
    (recon.mean() + vq_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # gradient passed the quantizer
    assert model.codebook.grad.abs().sum() > 0


def test_bad_inputs_to_encode_and_decode():
    model = tiny()
    with pytest.raises(DelvmError, match="encode expects images"):
        model.encode(torch.rand(3, 32, 32))
    with pytest.raises(DelvmError, match="not a multiple of the tokenizer's downsampling"):
        model.encode(torch.rand(1, 3, 31, 31))
    with pytest.raises(DelvmError, match=r"ids must be in \[0, 64\)"):
        model.decode(torch.full((1, 256), 64))
    with pytest.raises(DelvmError, match="not a square grid"):
        model.decode(torch.zeros(1, 200, dtype=torch.long))
