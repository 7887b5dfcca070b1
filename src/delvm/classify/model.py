"""The classifier: patch embedding -> the LVM's transformer trunk -> average pool -> linear head.

As in the paper's Section 6 (MAE's fine-tuning framework): the VQGAN encoder and the token
embedding are replaced by one convolution that cuts the image into patch x patch squares and
projects each to the trunk's width; the patches enter the trunk in scan-line order, as the VQ
codes did in pretraining, with the same rotary positions (with 256 px images and 16 px patches,
the 16 x 16 grid of the f16 tokenizer). With `position_grid` a smaller image keeps those
positions: MAE's 224 px gives 14 x 14 patches, and patch (row, column) takes rotary position
row x 16 + column, where the code of a 256 px image sat. Attention stays causal as pretrained,
or is made bidirectional (`causal = false`). Drop path (stochastic depth) is set per block by
`set_drop_path`. The final hidden states (after the trunk's own final norm) are
averaged over the patches and a linear layer gives the class logits.

On disk a classifier is a folder like a model checkpoint: ``config.json`` (format
``delvm-classifier``: the trunk's model config, the classifier config, the class names, the data
it was trained on) and ``model.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from delvm.errors import DelvmError
from delvm.fileio import read_json
from delvm.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, write_weights_folder
from delvm.model.transformer import ModelConfig, VisualLM

FORMAT = "delvm-classifier"
# ImageNet's channel statistics, the usual normalisation for fine-tuning (MAE, timm).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ClassifierConfig:
    num_classes: int = 0  # set from the data's classes
    image_size: int = 256
    patch_size: int = 16
    causal: bool = True  # attention as pretrained; False: every patch sees every patch
    # Rotary position of patch (row, column): row x position_grid + column; 0: the patches' own
    # grid. 16 with 224 px images: where the f16 tokenizer's codes of a 256 px image sat.
    position_grid: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel, of pixels in [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise DelvmError(
                f"classifier.image_size {self.image_size} must be a multiple of "
                f"classifier.patch_size {self.patch_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DelvmError("classifier.mean / std: three numbers each, std > 0")
        side = self.image_size // self.patch_size
        if self.position_grid and self.position_grid < side:
            raise DelvmError(
                f"classifier.position_grid {self.position_grid}: at least the {side} patches per "
                "row (image_size / patch_size), or 0 for the patches' own grid"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def position_span(self) -> int:
        """How many rotary positions the patches span: the last one's + 1."""
        side = self.image_size // self.patch_size
        return (side - 1) * (self.position_grid or side) + side

    def positions(self) -> Tensor:
        """The rotary position of each patch [num_patches], in scan-line order."""
        side = self.image_size // self.patch_size
        rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        return (rows * (self.position_grid or side) + columns).flatten()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DelvmError(f"unknown classifier config fields {unknown}; known: {sorted(known)}")
        return cls(**values)


class VisualClassifier(nn.Module):
    """Logits [B, classes] for pixels [B, 3, H, W] in [0, 1] (normalised inside)."""

    def __init__(self, trunk: VisualLM, config: ClassifierConfig):
        super().__init__()
        if config.position_span > trunk.config.max_seq_len:
            raise DelvmError(
                f"{config.num_patches} patches ({config.image_size} px / {config.patch_size} px "
                f"patches, squared) span {config.position_span} positions, more than the trunk's "
                f"max_seq_len "
                f"{trunk.config.max_seq_len}; use larger patches or smaller images"
            )
        if config.num_classes < 2:
            raise DelvmError(f"a classifier needs at least 2 classes, got {config.num_classes}")
        self.config = config
        hidden = trunk.config.hidden_size
        self.patch_embed = nn.Conv2d(3, hidden, config.patch_size, stride=config.patch_size)
        # The token embedding and the next-token head have no role here: the patch embedding
        # and the class head replace them, so they leave the module (and its state dict).
        trunk.embed = None
        trunk.head = None
        self.trunk = trunk
        self.head = nn.Linear(hidden, config.num_classes)
        self.init_derived()
        # MAE's initialisation of the new layers: the patch projection like a Linear (Xavier),
        # the head near zero so the first steps do not push random gradients into the trunk.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(hidden, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def init_derived(self) -> None:
        """(Re)build what the state dict does not hold: normalisation stats, rotary tables."""
        shape = (1, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(self.config.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(self.config.std).view(shape), persistent=False)
        self.register_buffer("positions", self.config.positions(), persistent=False)
        self.trunk.init_rotary()

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly over the trunk's blocks from 0 to ``rate`` (MAE's
        rule); active in training mode only."""
        rates = torch.linspace(0, rate, len(self.trunk.blocks)).tolist()
        for block, block_rate in zip(self.trunk.blocks, rates, strict=True):
            block.drop_path = block_rate

    def features(self, pixels: Tensor) -> Tensor:
        """The pooled representation [B, hidden]: the mean of the trunk's final hidden states."""
        size = self.config.image_size
        if pixels.shape[1:] != (3, size, size):
            raise DelvmError(
                f"classifier input {tuple(pixels.shape)}: expected [B, 3, {size}, {size}]"
            )
        x = (pixels - self.mean) / self.std
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, patches, hidden], scan-line order
        hidden = self.trunk.hidden_states(x, causal=self.config.causal, positions=self.positions)
        return hidden.mean(dim=1)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.features(pixels))


def classifier_from_checkpoint(
    folder: str | Path, config: ClassifierConfig, device: str | torch.device = "cpu"
) -> VisualClassifier:
    """A classifier whose trunk is a pretrained LVM's (a delvm checkpoint or a HF folder)."""
    return VisualClassifier(load_model(folder, device), config).to(device)


def save_classifier(
    state: dict[str, Tensor],
    folder: str | Path,
    trunk: ModelConfig,
    config: ClassifierConfig,
    classes: list[str],
    data: dict,
) -> Path:
    """Write a classifier's state dict as a checkpoint folder (weights first, config last)."""
    meta = {
        "format": FORMAT,
        "model": trunk.to_dict(),
        "classifier": config.to_dict(),
        "classes": list(classes),
        "data": data,
    }
    return write_weights_folder(folder, state, meta)


def load_classifier(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[VisualClassifier, dict]:
    """A classifier checkpoint folder -> (model in eval mode, its metadata), loaded strictly."""
    folder = Path(folder)
    meta = read_json(folder / CONFIG_NAME)
    if meta.get("format") != FORMAT:
        raise DelvmError(
            f"{folder / CONFIG_NAME}: not a classifier checkpoint (format {meta.get('format')!r}); "
            "pass a folder written by `delvm classify train`"
        )
    weights = folder / WEIGHTS_NAME
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as err:
        raise DelvmError(f"{weights}: missing, unreadable or truncated ({err})") from None
    with torch.device("meta"):
        model = VisualClassifier(
            VisualLM(ModelConfig.from_dict(meta["model"])),
            ClassifierConfig.from_dict(meta["classifier"]),
        )
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise DelvmError(f"{weights}: weights do not match {folder / CONFIG_NAME}")
    model.load_state_dict(state, strict=True, assign=True)
    model.init_derived()  # for real: they were built on the meta device
    return model.to(device).eval(), meta
