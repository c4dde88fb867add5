"""Image and label-map files: any image Pillow reads as upright RGB, label masks, and label maps
written as palette PNGs or drawn over their image.

Label maps follow the data contract (``weclip.contract``): 0 background, 1..C the classes, 255
ignore. One loader serves prepare's checks, training, inference and predict; one writer serves
converted masks, predictions and pseudo labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .files import write_atomically

IGNORE_INDEX = 255
# VOC's own palette gives 255 a pale cream (224, 224, 192); white reads better on overlays.
IGNORE_COLOUR = (255, 255, 255)


class BadFileError(ValueError):
    """An image or mask that cannot be used: the message is "<path>: <problem>"."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


def open_upright(path: str | Path, kind: str, max_pixels: int | None = None) -> Image.Image:
    """The decoded image or mask (``kind``, for the messages) in its own mode, turned upright
    by its EXIF orientation. Images over ``max_pixels`` are refused before decoding."""
    try:
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise BadFileError(path, f"{kind} is {im.width}x{im.height} = "
                                         f"{im.width * im.height} pixels, over data.max_pixels = "
                                         f"{max_pixels}; shrink it or raise data.max_pixels")
            return ImageOps.exif_transpose(im)  # a decoded copy: the file can close
    except BadFileError:
        raise
    except FileNotFoundError:
        raise BadFileError(path, f"{kind} file not found") from None
    except Exception as e:  # Pillow raises many types for broken files
        raise BadFileError(path, f"cannot decode {kind} ({type(e).__name__}: {e})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """An image of any Pillow mode -> 8-bit RGB, alpha dropped.

    Pillow converts palette, grey, alpha, CMYK, YCbCr and LAB images, but clips 16-bit, 32-bit
    and float ones to 0..255, so that most of them turn white; those are scaled first.
    16-bit by its type's range (/257: 65535 -> 255): as image viewers show a 16-bit PNG, and
    one scale for all images keeps their brightness comparable. 32-bit integer and float by
    the image's own range (min -> 0, max -> 255), as ImageJ shows them: no real image spans
    the 32-bit range, and floats have none.
    """
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image) / 257).round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        image = Image.fromarray(_stretch(np.asarray(image, np.float64)))
    return image.convert("RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    """float [H, W] -> uint8 [H, W], the finite values' min..max onto 0..255. NaN and inf
    (missing values in a float image) count as the minimum; a constant image becomes 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = values[finite].min(), values[finite].max()
    scale = 255 / (high - low) if high > low else 0.0
    return ((np.where(finite, values, low) - low) * scale).round().astype(np.uint8)


def open_rgb(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """The image file as an upright 8-bit RGB PIL image; see load_image."""
    return _to_rgb(open_upright(path, "image", max_pixels))


def load_image(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """An image file, any mode Pillow reads, as float [3, H, W] on the 0-255 scale, upright
    (its EXIF orientation applied; H, W are the upright size). The one loader of prepare's
    checks, training, inference and predict.

    Raises BadFileError (a ValueError, "<path>: <problem>") for a missing or undecodable file,
    and for one over ``max_pixels`` pixels (prepare passes data.max_pixels; later stages read
    what prepare accepted, and predict leaves the limit to Pillow's decompression-bomb check).
    """
    array = np.asarray(open_rgb(path, max_pixels), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_mask(path: str | Path) -> torch.Tensor:
    """A single-channel label mask as long [H, W], turned upright by its own EXIF orientation.

    Annotation tools save masks upright (as the photo is shown) and without EXIF, so this is
    usually nothing; a mask that kept its photo's EXIF is turned as the photo is. The image's
    orientation is never applied to its mask. Raises BadFileError like load_image, and for a
    mask of several channels.
    """
    mask = open_upright(path, "mask")
    bands = mask.getbands()
    if len(bands) != 1:
        raise BadFileError(path, f"mask has {len(bands)} channels ({''.join(bands)}); expected "
                                 "a single-channel PNG of class ids")
    return torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())


def palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC colours of ids 0..n-1 as uint8 [n, 3]; id 255 (ignore) is white.

    The VOC bit shuffle: bit k of the id's bits 0, 1, 2 (then 3, 4, 5, ...) goes to bit 7 - k
    of red, green and blue, so 0 is black, 1 (128, 0, 0), 2 (0, 128, 0), 15 (192, 128, 128).
    """
    ids = np.arange(n)
    colours = np.zeros((n, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    if n > IGNORE_INDEX:
        colours[IGNORE_INDEX] = IGNORE_COLOUR
    return colours


def label_array(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """A label map as uint8, refusing ids a palette index cannot hold."""
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"label ids must lie in 0..255, got {mask.min()}..{mask.max()}")
    return mask.astype(np.uint8)


def outline_mask(mask: np.ndarray | torch.Tensor, width: int = 1) -> np.ndarray:
    """Boolean [H, W]: the pixels within ``width`` pixels (8-neighbourhood) of a border between
    two labels of which at least one is a class (1..254).

    Borders between background and ignore (255) are not outlined: VOC draws ignore as a band
    around every object, which the object's own outline already marks. The outline lies on
    both sides of a border, so a region a pixel wide is outlined whole.
    """
    mask = label_array(mask)
    is_class = (mask > 0) & (mask != IGNORE_INDEX)
    rows, columns = mask.shape
    out = np.zeros(mask.shape, dtype=bool)
    padded = np.pad(mask, width, mode="edge")
    padded_class = np.pad(is_class, width, mode="edge")
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dy == dx == 0:
                continue
            near = (slice(width + dy, width + dy + rows), slice(width + dx, width + dx + columns))
            out |= (padded[near] != mask) & (padded_class[near] | is_class)
    return out


def overlay(image: np.ndarray, mask: np.ndarray | torch.Tensor, alpha: float = 0.5,
            outline: int = 0) -> np.ndarray:
    """Blend the VOC colours of ``mask`` [H, W] into ``image`` (uint8 [H, W, 3]) -> uint8 [H, W, 3].

    ``alpha`` is the weight of the mask colour. Background (black) is blended too, which dims
    it and makes the objects stand out. With ``outline`` > 0, the borders of the class regions
    (``outline_mask`` of that width) are drawn in white or black, whichever contrasts more with
    the blended pixel beneath, so that a mask whose colour is the object's own (a red mask on
    a red apple) still shows where it ends.
    """
    image = np.asarray(image)
    mask = label_array(mask)
    if image.shape != (*mask.shape, 3):
        raise ValueError(f"image {image.shape} does not match mask {mask.shape}")
    blended = (1 - alpha) * image.astype(np.float32) + alpha * palette()[mask].astype(np.float32)
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if outline > 0:
        edges = outline_mask(mask, outline)
        luminance = out.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        contrast = np.where(luminance[..., None] < 128, 255, 0).astype(np.uint8)
        out = np.where(edges[..., None], np.broadcast_to(contrast, out.shape), out)
    return out


def save_label_map(mask: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Save a label map [H, W] as a 'P'-mode PNG with the VOC palette, as VOC masks are stored.

    The pixel values are the class ids; the palette only colours them for viewers.
    """
    picture = Image.fromarray(label_array(mask))
    picture.putpalette(palette().tobytes())  # an 'L' image becomes 'P' with the same values
    return write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def write_image(image: np.ndarray, path: str | Path) -> Path:
    """Save an RGB uint8 [H, W, 3] image as PNG, atomically."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))
