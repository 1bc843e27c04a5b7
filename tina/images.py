"""The one path from an image file to what a target network sees.

Every consumer of image files goes through `render`: the dataset renderers (clip art, ImageFolder:
what the zoo trains and evaluates on), `tina predict`, image prompts, the demo, and therefore the
exported `model.pt2` (which takes `to_float`'s output). Arrays that never were files (Fashion-MNIST's
IDX, CIFAR's batches) reach the models through `to_float` too, and a PNG saved from one of them
renders back to the same array, so `tina predict` on a dataset's own test images scores exactly what
the evaluation scores.

    decode   PIL, at most `max_pixels` pixels; JPEGs decode at reduced size
    mode     alpha (or palette transparency) composited onto white; grey or RGB as the spec says
    crop     spec.crop: trim transparent / white margins first (the clip-art setting)
    polarity spec.background < 128 (light-on-dark data, Fashion-MNIST): an image with a light border
             is inverted; the border, not the mean, decides, so no Fashion-MNIST image is ever flipped
    resize   aspect kept, long side to spec.size, up or down (LANCZOS), centred on spec.background
    scale    uint8 -> float in [0, 1]; the model normalises with spec.mean / spec.std inside itself
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops, ImageOps

from tina.errors import TinaError
from tina.targets import ImageSpec

MAX_PIXELS = 50_000_000  # a user's image (predict, demo); larger files are refused before decoding
DATASET_MAX_PIXELS = 200_000_000  # dataset renderers: ~800 MB as RGBA; the ~170 MP clip art fits
_BAND_PIXELS = 4_000_000  # huge images are shrunk in horizontal bands of about this many pixels


class SkipImage(Exception):
    """A valid file we decline to decode (too large, blank); dataset builders count and skip them."""


def render(source, image: ImageSpec, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a path or binary file into uint8 (size, size, channels) as `image` prescribes.

    Raises SkipImage for files over `max_pixels` or with nothing drawn (when cropping), and PIL's
    own errors for unreadable files (`load_image` turns both into TinaError).
    """
    size = image.size
    with Image.open(source) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise SkipImage(f"{w}x{h} is over the {max_pixels / 1e6:.0f} MP decode budget")
        im.draft("RGB", (size * 4, size * 4))  # JPEG decodes at 1/2..1/8 scale; PNG ignores it
        im.load()
        if im.mode == "RGBA" or im.mode == "RGB":
            pass
        elif "transparency" in im.info or im.mode in ("P", "PA", "LA", "La", "RGBa"):
            im = im.convert("RGBA")
        else:
            im = im.convert("RGB")
        box = _content_box(im) if image.crop else (0, 0, *im.size)
        if box is None:
            raise SkipImage("blank image")
        small = _shrink(im, box, size * 4)
    if small.mode == "RGBA":  # composite only now: the shrink averaged premultiplied colours
        canvas = Image.new("RGBA", small.size, (255, 255, 255, 255))
        canvas.alpha_composite(small)
        small = canvas.convert("RGB")
    if image.channels == 1:
        small = small.convert("L")  # exact for grey pixels (R = G = B)
    if image.background < 128 and _border_mean(small) > 127.5:
        small = ImageOps.invert(small)  # a dark drawing on paper, for a model of light things on black
    scale = size / max(small.size)
    fit = (max(1, round(small.width * scale)), max(1, round(small.height * scale)))
    small = small.resize(fit, Image.Resampling.LANCZOS)  # a no-op copy when already at size
    fill = image.background if image.channels == 1 else (image.background,) * 3
    out = Image.new(small.mode, (size, size), fill)
    out.paste(small, ((size - fit[0]) // 2, (size - fit[1]) // 2))
    arr = np.array(out, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on PIL's read-only view)
    return arr[..., None] if arr.ndim == 2 else arr  # (size, size, C)


def to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1]: the one conversion every model input takes."""
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        x = torch.from_numpy(x if x.flags.writeable else x.copy())  # IDX files are read-only buffers
    return x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def load_image(path_or_file, image: ImageSpec, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """A user's image file as float (C, H, W) in [0, 1]; TinaError when it cannot be read."""
    name = getattr(path_or_file, "name", path_or_file)
    if isinstance(path_or_file, (str, Path)) and not Path(path_or_file).is_file():
        raise TinaError(f"image file {str(name)!r} does not exist")
    try:
        arr = render(path_or_file, image, max_pixels)
    except SkipImage as e:
        raise TinaError(f"{name}: {e}") from None
    except Image.DecompressionBombError:
        raise TinaError(f"{name}: image has too many pixels to decode safely") from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise TinaError(f"{name} is not a readable image ({type(e).__name__})") from None
    return to_float(arr[None])[0]  # (C, H, W)


def load_images(paths, image: ImageSpec) -> torch.Tensor:
    return torch.stack([load_image(p, image) for p in paths])  # (N, C, H, W)


def _border_mean(im: Image.Image) -> float:
    """Mean grey level of the outermost ring of pixels."""
    a = np.asarray(im.convert("L"), dtype=np.float64)
    ring = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return float(ring.mean())


def _content_box(im: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box of the drawing: non-transparent pixels, or non-white ones without alpha."""
    if im.mode == "RGBA":
        return im.getbbox()  # alpha only
    return ImageChops.difference(im, Image.new("RGB", im.size, (255, 255, 255))).getbbox()


def _shrink(im: Image.Image, box: tuple[int, int, int, int], target: int) -> Image.Image:
    """Crop `box` and shrink it by an integer factor to about `target` px on its long side.

    `Image.reduce` premultiplies alpha into a full-size copy; doing it band by band keeps the peak
    memory of a 170 MP image at its decoded size instead of twice that.
    """
    x0, y0, x1, y1 = box
    factor = max(1, max(x1 - x0, y1 - y0) // target)
    if factor == 1:
        return im.crop(box)
    out = Image.new(im.mode, (-(-(x1 - x0) // factor), -(-(y1 - y0) // factor)))
    band = factor * max(1, _BAND_PIXELS // (factor * (x1 - x0)))  # rows per band, a multiple of factor
    for y in range(y0, y1, band):
        out.paste(im.crop((x0, y, x1, min(y + band, y1))).reduce(factor), (0, (y - y0) // factor))
    return out
