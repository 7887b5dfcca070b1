"""Weight-only int8 decoding: each layer multiplies by its rounded weights, and a model decoded
with int8 copies answers as the model with those rounded weights would."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from delvm.errors import DelvmError
from delvm.inference.generate import Generator, SamplingConfig
from delvm.inference.quantize import Int8Linear, int8_copy
from delvm.model.transformer import VisualLM, preset

GREEDY = SamplingConfig(temperature=0)


def test_int8_linear_multiplies_by_its_rounded_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Int8Linear(linear)
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() == 127
    # Rounding moves each weight by at most half its row's scale.
    error = (layer.dequantized() - linear.weight).abs()
    assert (error <= 0.51 * layer.scales.float()[:, None]).all()
    x = torch.randn(2, 3, 64).bfloat16()
    y = layer(x)
    reference = F.linear(x.float(), layer.dequantized(), linear.bias)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2)
    assert layer(x.float()).equal(y)  # fp32 activations are read as bf16


def test_int8_copy_keeps_widths_the_kernel_cannot_read_and_the_model_itself():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    quantized = int8_copy(model)
    assert isinstance(quantized[0], nn.Linear) and quantized[0].weight.dtype == torch.bfloat16
    assert isinstance(quantized[2], Int8Linear)
    assert isinstance(model[2], nn.Linear) and model[2].weight.dtype == torch.float32
    x = torch.randn(5, 12)
    torch.testing.assert_close(quantized(x.bfloat16()).float(), model(x), rtol=0.05, atol=0.05)


def test_int8_copy_runs_on_cpus_only():
    model = VisualLM(preset("tiny")).to("meta")
    with pytest.raises(DelvmError, match="int8 decoding runs on CPUs.*--dtype auto"):
        int8_copy(model)


def _rounded(model: VisualLM) -> VisualLM:
    """The fp32 model with every weight an int8 copy multiplies by."""
    rounded = VisualLM(model.config).eval()
    rounded.load_state_dict(model.state_dict())
    quantized = dict(int8_copy(model).named_modules())
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if isinstance(quantized.get(name), Int8Linear):
                module.weight.copy_(quantized[name].dequantized())
    return rounded


def test_int8_decoding_follows_the_rounded_weights():
    torch.manual_seed(0)
    model = VisualLM(preset("tiny")).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)  # peaked: no argmax decided by rounding
    generator = Generator(model, decode_dtype=torch.int8)
    assert isinstance(generator.decoder.head, Int8Linear)
    assert model.head.weight.dtype == torch.float32  # the caller's model is untouched
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        logits = generator.decoder(ids).float()
        reference = _rounded(model)(ids)
    # bf16 activations: within bf16 rounding of the rounded model's logits.
    assert (logits - reference).abs().max() < 0.02 * reference.abs().max()
    # Each greedy code is the rounded model's argmax after the codes before it, or tied with it
    # to that rounding.
    prompt = torch.randint(0, 512, (2, 16))
    codes = generator(prompt, 20, GREEDY)
    with torch.no_grad():
        logits = _rounded(model)(torch.cat([prompt, codes], 1))[:, 15:-1]
    chosen = logits.gather(-1, codes[..., None]).squeeze(-1)
    assert (logits.amax(-1) - chosen <= 0.02 * logits.abs().max()).all()
