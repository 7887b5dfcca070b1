"""Export to / import from Hugging Face Llama, checked against `transformers` itself."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from delvm.cli import main
from delvm.errors import DelvmError
from delvm.inference.generate import SamplingConfig, generate
from delvm.model.checkpoint import load_model, save_model
from delvm.model.export import export_hf, import_hf
from delvm.model.transformer import VisualLM, preset


def random_model(**overrides) -> VisualLM:
    """A tiny model whose every weight is non-trivial (norm gains and biases too)."""
    torch.manual_seed(0)
    model = VisualLM(preset("tiny", rope_theta=500.0, norm_eps=1e-5, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
        model.head.weight.mul_(10)
    return model.eval()


@pytest.fixture(params=[{}, {"attention_bias": True}, {"embedding": "learned"}], ids=str)
def exported(request, tmp_path):
    model = random_model(**request.param)
    save_model(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    return model, hf, tmp_path


def test_exported_logits_match_transformers(exported):
    model, hf, _ = exported
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_exported_config_carries_eps_theta_and_no_special_tokens(exported):
    model, hf, tmp_path = exported
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rms_norm_eps"] == model.config.norm_eps == hf.config.rms_norm_eps
    assert hf.config.rope_parameters["rope_theta"] == model.config.rope_theta
    assert config["bos_token_id"] is config["eos_token_id"] is config["pad_token_id"] is None
    assert not hf.config.tie_word_embeddings


def test_greedy_generate_matches_transformers(exported):
    model, hf, _ = exported
    prompt = torch.randint(0, model.config.vocab_size, (2, 32))
    ours = generate(model, prompt, 24, SamplingConfig(temperature=0))
    theirs = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=24,
        min_new_tokens=24,
        do_sample=False,
    )[:, 32:]
    assert torch.equal(ours, theirs)


def test_import_round_trip(exported):
    model, _, tmp_path = exported
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_model(tmp_path / "back").eval()
    assert back.config.embedding == "learned"
    ids = torch.randint(0, model.config.vocab_size, (1, 50))
    with torch.no_grad():
        assert (back(ids) - model(ids)).abs().max() <= 1e-5


def test_import_reads_pytorch_bin_with_weights_only(tmp_path):
    hf_folder = tmp_path / "hf"
    save_model(random_model(), tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", hf_folder)
    hf = LlamaForCausalLM.from_pretrained(hf_folder)
    (hf_folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), hf_folder / "pytorch_model.bin")
    back = load_model(import_hf(hf_folder, tmp_path / "back"))
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert (back(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_vit_checkpoint_gets_a_clear_error(tmp_path):
    save_model(VisualLM(preset("tiny-vit")), tmp_path / "ckpt")
    with pytest.raises(DelvmError, match="ViT-style"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")


def test_import_rejects_unknown_weights_and_models(tmp_path):
    save_model(random_model(), tmp_path / "ckpt")
    folder = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(DelvmError, match="unexpected weights"):
        import_hf(folder, tmp_path / "back")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(DelvmError, match="mistral"):
        import_hf(folder, tmp_path / "back")


def test_cli_export_and_errors(tmp_path, capsys):
    save_model(random_model(), tmp_path / "ckpt")
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert "names no tokenizer" in capsys.readouterr().err  # a bare checkpoint names none
    assert main(["export-hf", str(tmp_path / "nope"), str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("delvm: error:") and "nope" in err and "\n" not in err
    # Any command taking a checkpoint also takes a Hugging Face folder directly.
    assert main(["export-hf", str(tmp_path / "hf"), str(tmp_path / "hf3")]) == 0
    assert main(["import-hf", str(tmp_path / "ckpt"), str(tmp_path / "x")]) == 2
    assert "model_type" in capsys.readouterr().err


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cli_export_dtype_writes_the_weights_rounded_to_it(tmp_path, name, dtype):
    from safetensors.torch import load_file

    model = random_model()
    save_model(model, tmp_path / "ckpt")
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "full")]) == 0
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / name), "--dtype", name]) == 0
    full, half = (load_file(tmp_path / d / "model.safetensors") for d in ("full", name))
    assert all(half[k].dtype == dtype and torch.equal(half[k], full[k].to(dtype)) for k in full)
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("full", name)]
    assert sizes[1] < 0.55 * sizes[0]
    assert json.loads((tmp_path / name / "config.json").read_text())["torch_dtype"] == str(
        dtype
    ).removeprefix("torch.")
    # transformers reads it: our logits up to the rounding of the weights (2 % of the largest).
    hf = LlamaForCausalLM.from_pretrained(tmp_path / name).eval()
    assert hf.dtype == dtype
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        ours, theirs = model(ids), hf.float()(ids).logits
    assert (theirs - ours).abs().max() <= 0.02 * ours.abs().max()


def test_cli_import_num_codes_keeps_generation_inside_the_codebook(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert (
        main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--num-codes", "64"]) == 0
    )
    model = load_model(tmp_path / "ckpt").eval()
    assert (model.config.vocab_size, model.config.codes) == (80, 64)
    prompt = torch.randint(0, 64, (4, 16))
    with torch.no_grad():
        assert (model(prompt) - hf(prompt).logits).abs().max().item() <= 1e-4
    # Near-uniform logits: 96 draws over all 80 ids would all be codes with odds of 0.8^96.
    new = generate(model, prompt, 24, SamplingConfig(temperature=1.0, seed=0))
    assert new.shape == (4, 24) and new.max() < 64
