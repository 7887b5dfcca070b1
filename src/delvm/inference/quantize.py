"""Weight-only int8 decoding on CPUs (``--dtype int8``, ``Generator(decode_dtype=torch.int8)``).

Decoding reads every weight once per code. A CPU without bf16 units converts each bf16 weight
before multiplying it, so a bf16 decoding copy is bound by conversion, not by reading memory;
torch's weight-only int8 kernel (``torch._weight_int8pack_mm``, bf16 activations) converts int8
weights faster still, and reads half the bytes. It needs no compiling: torchao's int8
weight-only tensors are as fast only under torch.compile, and convert the whole weight on every
call without it.

Each Linear's weight becomes int8 with one scale per output channel (symmetric: the row's
largest magnitude is 127), so a weight moves by at most half its row's scale. The answers are
those of slightly different weights: greedy codes may differ from the model's where two codes
were nearly tied.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from delvm.errors import DelvmError

# The kernel reads bf16 activations 8 at a time: a Linear whose input width is not a multiple
# of 8 would read past the row (NaN or a crash), so it stays a bf16 Linear.
KERNEL_WIDTH = 8


class Int8Linear(nn.Module):
    """A Linear with an int8 weight [out, in] and a bf16 scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        quantized = (weight / scales.float()[:, None]).round().clamp(-127, 127)
        self.register_buffer("weight", quantized.to(torch.int8))
        self.register_buffer("scales", scales)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        # The kernel takes activations in its scales' dtype, as contiguous rows.
        rows = x.reshape(-1, x.shape[-1]).to(self.scales.dtype).contiguous()
        y = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def dequantized(self) -> Tensor:
        """The weight [out, in] this layer multiplies by, in fp32."""
        return self.weight.float() * self.scales.float()[:, None]


def int8_copy(model: nn.Module) -> nn.Module:
    """A bf16 copy of a CPU ``model`` whose Linears multiply by int8 weights (`Int8Linear`);
    the model itself is not changed."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise DelvmError(
            f"int8 decoding runs on CPUs, and the model is on {device}: decode in bf16 there "
            "(--dtype auto)"
        )
    quantized = copy.deepcopy(model).to(torch.bfloat16)
    for module in list(quantized.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and child.in_features % KERNEL_WIDTH == 0:
                setattr(module, name, Int8Linear(child))
    return quantized
