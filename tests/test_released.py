"""The published checkpoints' formats: DeLVM's InternLM folders and LVM's Llama (vocab 8292)."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from delvm.cli import main
from delvm.errors import DelvmError
from delvm.inference.generate import SamplingConfig, generate
from delvm.model.checkpoint import load_model
from delvm.model.transformer import VisualLM, count_parameters, preset

# Made by DeLVM's InternLM modelling code (tests/fixtures/delvm_released_hf_parity/README.md).
FIXTURE = Path(__file__).parent / "fixtures" / "delvm_released_hf_parity"


@pytest.fixture()
def released(tmp_path):
    """A writable copy of DeLVM's released-format fixture, with shipped code that must not run."""
    folder = tmp_path / "llama_300m_hf"
    shutil.copytree(FIXTURE / "checkpoint", folder)
    marker = tmp_path / "modeling_code_ran"
    (folder / "modeling_internlm.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('shipped code executed')\n"
    )
    return folder, marker


def expected_logits(model: VisualLM) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(FIXTURE / "expected.npz")
    ids = torch.from_numpy(data["input_ids"])
    with torch.no_grad():
        ours = model(ids)
    return ours, torch.from_numpy(data["logits"])


def test_internlm_safetensors_matches_reference_logits(released):
    folder, marker = released
    model = load_model(folder)
    assert model.config.attention_bias and model.config.intermediate_size == 256
    ours, reference = expected_logits(model)
    assert (ours - reference).abs().max().item() <= 1e-4
    assert not marker.exists() and "modeling_internlm" not in sys.modules


def test_internlm_pytorch_bin_loads_too(released):
    folder, marker = released
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    ours, reference = expected_logits(load_model(folder))
    assert (ours - reference).abs().max().item() <= 1e-4
    assert not marker.exists()


def test_import_hf_cli_writes_an_equal_delvm_checkpoint(released, tmp_path):
    folder, marker = released
    assert main(["import-hf", str(folder), str(tmp_path / "ckpt")]) == 0
    ours, reference = expected_logits(load_model(tmp_path / "ckpt"))
    assert (ours - reference).abs().max().item() <= 1e-4
    assert not marker.exists()


def test_pickle_with_code_is_refused(released):
    folder, _ = released
    (folder / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(DelvmError, match="unsafe weights file"):
        load_model(folder)


def test_unexpected_weight_in_release_is_an_error(released):
    folder, _ = released
    from safetensors.torch import save_file

    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(DelvmError, match="unexpected weights"):
        load_model(folder)


@pytest.fixture()
def lvm_folder(tmp_path):
    """An LVM-format folder written by transformers: Llama, learned embedding, vocab 8292."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8292, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight[8192:] *= 50  # the unused ids would win an unrestricted argmax
    hf.save_pretrained(tmp_path / "lvm")
    return tmp_path / "lvm", hf


def test_lvm_folder_logits_and_generation_stay_in_codebook(lvm_folder):
    folder, hf = lvm_folder
    model = load_model(folder)
    assert model.config.vocab_size == 8292 and model.config.codes == 8192
    ids = torch.randint(0, 8192, (2, 40))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours[..., :8192] - theirs[..., :8192]).abs().max() <= 1e-4
    assert (theirs[:, -1].argmax(-1) >= 8192).any(), "the test must tempt generation off-codebook"
    for sampling in (SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, seed=3)):
        out = generate(model, ids, 64, sampling)
        assert out.max() < 8192
    with pytest.raises(DelvmError, match="VQ codes"):
        generate(model, torch.full((1, 4), 8200), 2)


def test_unsupported_model_type_is_named(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(DelvmError, match="'gpt2' is not supported"):
        load_model(folder)


@pytest.mark.parametrize(
    ("name", "total"),
    [("delvm-300m-hf", 300e6), ("delvm-1b-hf", 1.16e9), ("lvm-7b", 6.6e9)],
)
def test_release_presets_have_the_published_sizes(name, total):
    with torch.device("meta"):
        model = VisualLM(preset(name))
    assert count_parameters(model)["total"] == pytest.approx(total, rel=0.03)
