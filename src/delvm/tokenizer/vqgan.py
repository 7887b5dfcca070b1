"""The VQGAN image tokenizer, in the on-disk format of open-muse's `VQGANModel`.

LVM and DeLVM tokenize with the public f16/8192 VQGAN (`vqgan-f16-8192-laion`): a folder with
``config.json`` (the open-muse constructor arguments) and ``pytorch_model.bin`` (a plain state
dict). This module rebuilds that network with the same parameter names and order of operations,
so such a folder loads strictly and gives the same tokens; it also reads and writes
``model.safetensors``.

Images are RGB in [0, 1]; an f-times downsampling encoder gives an (H/f) x (W/f) grid of vectors,
each replaced by the index of its nearest codebook row (plain L2 argmin), in scan-line order.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from delvm.errors import DelvmError
from delvm.fileio import atomic_write, read_json, write_json

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
CLASS_NAME = "VQGANModel"  # open-muse's `_class_name`, written so open-muse can read our folders
GROUPS = 32  # every GroupNorm of the format has 32 groups


@dataclass(frozen=True)
class VQGANConfig:
    """Every constructor argument of open-muse's `VQGANModel`, with its defaults.

    The defaults are open-muse's own, so a config.json that omits a field means what it means
    there; `PRESETS` in `delvm.tokenizer.presets` holds the public f16-8192 checkpoint's values.
    """

    resolution: int = 256
    num_channels: int = 3
    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    no_attn_mid_block: bool = False
    z_channels: int = 256
    num_embeddings: int = 1024
    quantized_embed_dim: int = 256
    dropout: float = 0.0
    resample_with_conv: bool = True
    commitment_cost: float = 0.25
    # Not an open-muse argument (open-muse always uses GroupNorm): "none" drops every norm layer,
    # for small CPU shapes where 32 groups over 32 channels normalise each channel per image and
    # erase the colour of flat regions. Written to config.json only when it is not "group".
    norm: str = "group"

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if self.norm not in ("group", "none"):
            raise DelvmError(f"VQGAN config: norm {self.norm!r}: choose 'group' or 'none'")
        widths = [self.hidden_channels * m for m in self.channel_mult]
        if not self.channel_mult or any(w <= 0 for w in widths):
            raise DelvmError(
                f"VQGAN config: hidden_channels x channel_mult = {widths}; every width must be "
                "positive"
            )
        if self.norm == "group" and any(w % GROUPS for w in widths):
            raise DelvmError(
                f"VQGAN config: hidden_channels x channel_mult = {widths}; with norm 'group' every "
                f"width must be a multiple of {GROUPS} (the GroupNorm groups), or set norm 'none'"
            )
        if self.resolution % self.downsample_factor:
            raise DelvmError(
                f"VQGAN config: resolution {self.resolution} is not a multiple of the "
                f"downsampling factor {self.downsample_factor} (2 ** (len(channel_mult) - 1))"
            )
        positive = ("num_channels", "num_res_blocks", "z_channels", "num_embeddings")
        for name in (*positive, "quantized_embed_dim"):
            if getattr(self, name) < 1:
                raise DelvmError(f"VQGAN config: {name} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise DelvmError(f"VQGAN config: dropout {self.dropout} must be in [0, 1)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor

    def to_dict(self) -> dict:
        out = asdict(self)
        out["channel_mult"] = list(self.channel_mult)
        out["attn_resolutions"] = list(self.attn_resolutions)
        if self.norm == "group":
            del out["norm"]  # the folder stays exactly an open-muse config
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "VQGAN config") -> VQGANConfig:
        """Build from open-muse's config.json dict (``_class_name`` etc. are metadata)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            raise DelvmError(f"{source}: unknown VQGAN setting(s) {unknown}; remove them")
        name = data.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise DelvmError(f"{source}: _class_name is {name!r}, not a {CLASS_NAME} config")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except DelvmError as err:  # name the file the bad value came from
            raise DelvmError(f"{source}: {err}") from None


# ---- building blocks (names match open-muse's state dict keys) --------------------------------


def _norm(channels: int, kind: str) -> nn.Module:
    if kind == "none":
        return nn.Identity()  # no parameters, so no state dict keys
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, norm: str):
        super().__init__()
        self.norm1 = _norm(in_channels, norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1-conv projections, residual."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.norm = _norm(channels, norm)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in "qkvo")

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as open-muse
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: taming's convention


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks (each followed by attention when
    this resolution is listed), then an optional resampling."""

    def __init__(self, widths: list[tuple[int, int]], attn: bool, dropout: float, norm: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, dropout, norm) for i, o in widths)
        self.attn = (
            nn.ModuleList(AttnBlock(o, norm) for _, o in widths) if attn else nn.ModuleList()
        )
        self.downsample: Downsample | None = None
        self.upsample: Upsample | None = None

    def forward(self, x: Tensor) -> Tensor:
        # open-muse applies attention only when a level has more than one attention block (a
        # quirk that matters only for num_res_blocks == 1); we always apply the blocks we have.
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, attn: bool, dropout: float, norm: str):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm)
        self.attn_1 = AttnBlock(channels, norm) if attn else None
        self.block_2 = ResnetBlock(channels, channels, dropout, norm)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        widths = [c.hidden_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.num_channels, c.hidden_channels, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = c.hidden_channels, c.resolution
        for i, width in enumerate(widths):
            pairs = [(block_in if j == 0 else width, width) for j in range(c.num_res_blocks)]
            level = Level(pairs, res in c.attn_resolutions, c.dropout, c.norm)
            if i != len(widths) - 1:
                level.downsample = Downsample(width, c.resample_with_conv)
                res //= 2
            self.down.append(level)
            block_in = width
        self.mid = MidBlock(widths[-1], not c.no_attn_mid_block, c.dropout, c.norm)
        self.norm_out = _norm(widths[-1], c.norm)
        self.conv_out = nn.Conv2d(widths[-1], c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        widths = [c.hidden_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], not c.no_attn_mid_block, c.dropout, c.norm)
        # `up[i]` works at the resolution of encoder level i; they run from the coarsest up.
        levels = []
        for i, width in enumerate(widths):
            block_in = widths[min(i + 1, len(widths) - 1)]
            pairs = [(block_in if j == 0 else width, width) for j in range(c.num_res_blocks + 1)]
            level = Level(pairs, c.resolution // 2**i in c.attn_resolutions, c.dropout, c.norm)
            if i != 0:
                level.upsample = Upsample(width, c.resample_with_conv)
            levels.append(level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(widths[0], c.norm)
        self.conv_out = nn.Conv2d(widths[0], c.num_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-row lookup (L2), with the VQ-VAE losses and straight-through gradient."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def nearest(self, z: Tensor, chunk: int = 4096) -> Tensor:
        """Row vectors z [N, D] -> code ids [N], in fp32 whatever the autocast (ties are close)."""
        codes = self.embedding.weight.float()
        codes_sq = codes.pow(2).sum(1)
        out = []
        # Chunked: N x V distances for a large batch at 8192 codes would be gigabytes.
        for part in z.float().split(chunk):
            # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, open-muse's formula and summation order
            distances = torch.addmm(
                part.pow(2).sum(1, keepdim=True) + codes_sq, part, codes.t(), alpha=-2.0
            )
            out.append(distances.argmin(1))
        return torch.cat(out)

    def lookup(self, ids: Tensor, grid: tuple[int, int]) -> Tensor:
        """ids [B, h*w] -> latents [B, D, h, w]."""
        return self.embedding(ids).view(ids.shape[0], *grid, -1).permute(0, 3, 1, 2)

    def forward(self, z: Tensor, commitment_cost: float) -> tuple[Tensor, Tensor, Tensor]:
        """Training view: (straight-through z_q [B, D, h, w], ids [B, h*w], VQ loss).

        The loss is the VQ-VAE paper's: ||sg(z) - e||^2 moves the codebook, beta ||z - sg(e)||^2
        commits the encoder. (open-muse/taming's legacy code swaps the two weights.)
        """
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # losses in fp32 under autocast
        ids = self.nearest(flat.detach())
        z_q = self.embedding(ids)
        loss = F.mse_loss(z_q, flat.detach()) + commitment_cost * F.mse_loss(flat, z_q.detach())
        z_q = flat + (z_q - flat).detach()
        return z_q.view(b, h, w, d).permute(0, 3, 1, 2), ids.view(b, h * w), loss


# ---- the model -------------------------------------------------------------------------------


class VQGAN(nn.Module):
    """Encoder -> 1x1 quant_conv -> nearest code -> 1x1 post_quant_conv -> decoder."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.num_embeddings, config.quantized_embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.quantized_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.quantized_embed_dim, config.z_channels, 1)

    # -- facts other stages rely on

    @property
    def codebook(self) -> Tensor:
        """The codebook [V, D] (what the LLM's codebook embedding freezes)."""
        return self.quantize.embedding.weight

    @property
    def num_codes(self) -> int:
        return self.config.num_embeddings

    @property
    def grid_size(self) -> int:
        """Tokens per side of an image at the configured resolution."""
        return self.config.grid_size

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the canonical config JSON and every weight."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return digest.hexdigest()[:16]

    # -- the differentiable path (training)

    def latents(self, pixels: Tensor) -> Tensor:
        """[B, C, H, W] in [0, 1] -> pre-quantization latents [B, D, H/f, W/f]."""
        return self.quant_conv(self.encoder(pixels))

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Quantized latents -> pixels in the model's [0, 1] space, unclamped."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(reconstruction unclamped, ids [B, h*w], VQ loss, latents before quantization)."""
        z = self.latents(pixels)
        z_q, ids, vq_loss = self.quantize(z, self.config.commitment_cost)
        return self.decode_latents(z_q), ids, vq_loss, z

    # -- inference

    @torch.inference_mode()
    def encode(self, images: Tensor | np.ndarray, bf16: bool = False) -> Tensor:
        """Images -> code ids [B, h*w] (int64), scan-line order.

        ``images``: uint8 [B, H, W, C] or [B, C, H, W] (0..255), or float [B, C, H, W] in [0, 1];
        H and W multiples of the downsampling factor. ``bf16`` runs the convolutions under bf16
        autocast (the nearest-code search stays fp32).
        """
        pixels = self.to_pixels(images)
        with torch.autocast(pixels.device.type, torch.bfloat16, enabled=bf16):
            z = self.latents(pixels)
        b, d, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h * w)

    @torch.inference_mode()
    def decode(self, ids: Tensor | np.ndarray, bf16: bool = False, clamp: bool = True) -> Tensor:
        """Code ids [B, h*w] (h = w) -> float images [B, C, H, W], clamped to [0, 1]."""
        if isinstance(ids, np.ndarray):
            ids = np.array(ids, dtype=np.int64)  # a copy: uint16 stores, read-only memory maps
        ids = torch.as_tensor(ids, device=self.codebook.device).long()
        if ids.dim() != 2:
            raise DelvmError(f"decode expects ids of shape [batch, tokens], got {tuple(ids.shape)}")
        side = math.isqrt(ids.shape[1])
        if side * side != ids.shape[1]:
            raise DelvmError(f"decode: {ids.shape[1]} tokens per image is not a square grid")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_codes):
            raise DelvmError(
                f"decode: ids must be in [0, {self.num_codes}); got {ids.min()}..{ids.max()} "
                "(tokens from a different tokenizer?)"
            )
        z_q = self.quantize.lookup(ids, (side, side))
        with torch.autocast(z_q.device.type, torch.bfloat16, enabled=bf16):
            pixels = self.decode_latents(z_q)
        pixels = pixels.float()
        return pixels.clamp(0.0, 1.0) if clamp else pixels

    def to_pixels(self, images: Tensor | np.ndarray) -> Tensor:
        """uint8 (HWC or CHW) or float CHW images -> float [B, C, H, W] in [0, 1] on our device."""
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # e.g. arrays straight from PIL; torch wants writable memory
        x = torch.as_tensor(images)
        c = self.config.num_channels
        if x.dim() != 4 or c not in (x.shape[1], x.shape[-1]):
            raise DelvmError(
                f"encode expects images [batch, H, W, {c}] or [batch, {c}, H, W], "
                f"got {tuple(x.shape)}"
            )
        if x.shape[1] != c:
            x = x.permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif not x.is_floating_point():
            raise DelvmError(f"encode expects uint8 or float images, got {x.dtype}")
        f = self.config.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise DelvmError(
                f"encode: image size {x.shape[2]}x{x.shape[3]} is not a multiple of the "
                f"tokenizer's downsampling factor {f}; resize to {self.config.resolution}"
            )
        weight = self.encoder.conv_in.weight
        return x.to(weight.device, weight.dtype)

    # -- files

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> VQGAN:
        """Load a folder holding config.json and model.safetensors or pytorch_model.bin."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DelvmError(f"{folder}: not a tokenizer folder (no such directory)")
        config = VQGANConfig.from_dict(read_json(folder / CONFIG_NAME), str(folder / CONFIG_NAME))
        state, source = _read_weights(folder)
        with torch.device("meta"):
            model = cls(config)
        _check_keys(model, state, source)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json (open-muse's layout) and model.safetensors, each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder / SAFETENSORS_NAME, lambda tmp: save_file(state, str(tmp)))
        write_json(
            folder / CONFIG_NAME,
            {"_class_name": CLASS_NAME, "_version": "0.0.1", **self.config.to_dict()},
        )
        return folder


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> VQGAN:
    """The tokenizer in folder ``path`` (a `save_pretrained` folder or an open-muse checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise DelvmError(
            f"{path}: not a tokenizer folder; give a folder with config.json and model.safetensors "
            "or pytorch_model.bin"
        )
    return VQGAN.from_pretrained(path, device)


def read_state(path: str | Path) -> dict[str, Tensor]:
    """A state dict from .safetensors, or from a .bin/.pth without unpickling any code."""
    path = Path(path)
    if not path.is_file():
        raise DelvmError(f"{path}: no such weights file")
    if path.stat().st_size == 0:
        raise DelvmError(f"{path}: empty weights file (0 bytes); copy it again")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise DelvmError(f"{path}: unreadable or truncated safetensors ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, refused pickle: one user problem
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DelvmError(
            f"{path}: not a plain state dict readable with weights_only=True ({message})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DelvmError(f"{path}: expected a state dict of tensors")
    return state


def _read_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).is_file():
            return read_state(folder / name), folder / name
    raise DelvmError(f"{folder}: no {SAFETENSORS_NAME} or {BIN_NAME} in the tokenizer folder")


def _check_keys(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Strict matching with a message that says what differs (names first, then shapes)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    if missing or unexpected:
        raise DelvmError(
            f"{source}: weights do not match config.json: {len(missing)} missing "
            f"[{show(missing)}], {len(unexpected)} unexpected [{show(unexpected)}]"
        )
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise DelvmError(
            f"{source}: weights do not match config.json: {len(wrong)} shape mismatch(es), e.g. "
            f"{k} is {tuple(state[k].shape)} on disk but {tuple(expected[k].shape)} by the config"
        )
