"""Reading image files of any kind users have into clean RGB arrays.

One owner for the rules every stage shares: EXIF orientation applied; palette, grayscale,
RGBA (composited on black), CMYK and 16-bit images converted to 8-bit RGB; oversized files refused
before decoding (decompression-bomb guard); any unreadable file a `DelvmError` naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from delvm.errors import DelvmError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# Refused from the header, before decoding: Pillow's own bomb check only warns below ~179 MP.
MAX_IMAGE_PIXELS = 64_000_000


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly under `folder` (recursively), sorted; error if the folder is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DelvmError(f"{folder}: no such folder (check the path)")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the full range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """`Image.open` (header only) with the pixel limit checked before anything is decoded.

    Pillow's own decompression-bomb check warns from ~89 MP and raises from ~179 MP; the warning
    is silenced because this limit is lower, and the error becomes a DelvmError like ours.
    Raises DelvmError (one line naming the file) for missing, empty, non-image or oversized files.
    """
    path = Path(path)
    if not path.is_file():
        raise DelvmError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DelvmError(f"{path}: empty file (0 bytes); re-export or remove it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:  # not an OSError
        raise DelvmError(f"{path}: exceeds the pixel limit ({err}); downscale it") from None
    except UnidentifiedImageError:
        raise DelvmError(
            f"{path}: not an image Pillow can read (remove it or convert it)"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DelvmError(f"{path}: unreadable or truncated image ({err}); re-export it") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DelvmError(
            f"{path}: {width}x{height} exceeds the {max_pixels:,}-pixel limit "
            "(downscale it, or raise max_pixels if you trust the file)"
        )
    return image


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read `path` as an RGB uint8 array [H, W, 3], EXIF orientation applied.

    Raises DelvmError (one line naming the file) for missing, empty, truncated, non-image or
    oversized files.
    """
    with open_image(path, max_pixels) as image:
        try:
            with warnings.catch_warnings():  # a frame bigger than the header said
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
            image = ImageOps.exif_transpose(image)
            return np.asarray(_to_rgb(image), dtype=np.uint8).copy()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
                Image.DecompressionBombError) as err:  # fmt: skip
            raise DelvmError(
                f"{path}: unreadable or truncated image ({err}); re-export it"
            ) from None


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is `size` (bicubic), then crop the central size x size square."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        pil = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
        image = np.asarray(pil)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def load_square(path: str | Path, size: int) -> np.ndarray:
    """`load_image` then `resize_center_crop`: the tokenizer's view of an arbitrary file."""
    return resize_center_crop(load_image(path), size)
