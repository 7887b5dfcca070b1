"""The adversarial and perceptual parts of VQGAN training (Esser et al. 2021).

- `PatchDiscriminator`: pix2pix's N-layer PatchGAN, trained with the hinge loss.
- `adaptive_gan_weight`: scales the generator's GAN loss so its gradient at the decoder's last
  layer is as large as the reconstruction loss's.
- `LPIPS`: the VGG16 perceptual distance of Zhang et al. 2018, built from weights the user has on
  disk (nothing is downloaded): torchvision's ``vgg16`` state dict (``features.*``) and,
  optionally, the LPIPS linear heads (``lin0.model.1.weight`` ... ``lin4``, the `lpips` package's
  ``weights/v0.1/vgg.pth``). Without the heads every channel weighs the same.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from delvm.errors import DelvmError
from delvm.tokenizer.vqgan import read_state


class PatchDiscriminator(nn.Module):
    """Conv(4x4, stride 2) stack ending in a map of real/fake logits, one per image patch."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [
                nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(width * mult),
                nn.LeakyReLU(0.2),
            ]
        mods.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*mods)
        for m in self.modules():  # DCGAN initialisation, as taming
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images * 2.0 - 1.0)  # [0, 1] pixels -> [-1, 1]


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(
    rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """||d rec / d last|| / ||d gan / d last||, clamped: balances the two gradients."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ---- LPIPS -----------------------------------------------------------------------------------

# VGG16 ("D"): conv widths, "M" = max-pool. Indices in the Sequential match torchvision's.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS's input normalisation, for images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    mods: list[nn.Module] = []
    width = 3
    for item in _VGG16:
        if item == "M":
            mods.append(nn.MaxPool2d(2, 2))
        else:
            mods += [nn.Conv2d(width, item, 3, padding=1), nn.ReLU()]
            width = item
    return nn.Sequential(*mods)


class LPIPS(nn.Module):
    """Perceptual distance between images in [0, 1] ([B, 3, H, W] -> [B]); frozen."""

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in _TAP_WIDTHS)
        for lin in self.lins:
            nn.init.constant_(lin.weight, 1.0 / lin.in_channels)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, paths: list[str | Path]) -> LPIPS:
        """Merge the given weight files: VGG16 ``features.*`` required, ``lin*`` heads optional."""
        model = cls()
        state: dict[str, Tensor] = {}
        sources: dict[str, Path] = {}
        for path in paths:
            for key, value in read_state(path).items():
                state[key], sources[key] = value, Path(path)
        prefix = "features."
        features = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        missing = sorted(set(model.features.state_dict()) - set(features))
        if missing:
            where = ", ".join(str(p) for p in paths)
            raise DelvmError(
                f"{where}: not VGG16 weights (missing features.{missing[0]} and "
                f"{len(missing) - 1} more); give torchvision's vgg16 state dict"
            )
        _load_checked(model.features, features, {k: sources[prefix + k] for k in features})
        for i, lin in enumerate(model.lins):
            key = f"lin{i}.model.1.weight"
            if key in state:
                _load_checked(lin, {"weight": state[key]}, {"weight": sources[key]})
        return model

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        x = torch.cat([a, b]) * 2.0 - 1.0
        x = (x - self.shift) / self.scale
        total = 0.0
        taps = iter(zip(_TAPS, self.lins, strict=True))
        tap, lin = next(taps)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == tap:
                fa, fb = _unit(x).chunk(2)
                total = total + lin((fa - fb).pow(2)).mean((1, 2, 3))
                tap, lin = next(taps, (None, None))
                if tap is None:
                    break
        return total


def _unit(x: Tensor) -> Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


def _load_checked(module: nn.Module, state: dict[str, Tensor], sources: dict[str, Path]) -> None:
    for key, target in module.state_dict().items():
        if state[key].shape != target.shape:
            raise DelvmError(
                f"{sources[key]}: {key} is {tuple(state[key].shape)}, expected "
                f"{tuple(target.shape)} (not VGG16 / LPIPS-vgg weights)"
            )
    module.load_state_dict({k: state[k].float() for k in module.state_dict()})
