"""Reading user image files into the tensors a generated model takes (float (C, H, W) in [0, 1])."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tina.errors import TinaError
from tina.targets import ImageSpec

MAX_PIXELS = 50_000_000  # refuse decompression bombs; clip art up to ~170 MP is reduced while decoding


def load_image(path_or_file, image: ImageSpec) -> torch.Tensor:
    """Decode, composite transparency onto white, convert to the model's channels and size."""
    from PIL import Image, UnidentifiedImageError

    name = getattr(path_or_file, "name", path_or_file)
    if isinstance(path_or_file, (str, Path)) and not Path(path_or_file).is_file():
        raise TinaError(f"image file {str(name)!r} does not exist")
    try:
        with Image.open(path_or_file) as im:
            if im.width * im.height > 4 * MAX_PIXELS:
                raise TinaError(f"{name}: image of {im.width}x{im.height} pixels is too large")
            im.draft("RGB", (image.size * 4, image.size * 4))  # JPEG: decode at reduced size
            if im.width * im.height > MAX_PIXELS:
                im = im.reduce(max(1, int((im.width * im.height / MAX_PIXELS) ** 0.5) + 1))
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im).convert("L" if image.channels == 1 else "RGB")
            im.thumbnail((image.size, image.size), Image.Resampling.LANCZOS)
            canvas = Image.new(im.mode, (image.size, image.size), 255 if image.channels == 1 else (255, 255, 255))
            canvas.paste(im, ((image.size - im.width) // 2, (image.size - im.height) // 2))
    except Image.DecompressionBombError:
        raise TinaError(f"{name}: image has too many pixels to decode safely") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise TinaError(f"{name} is not a readable image ({type(e).__name__})") from None
    arr = np.asarray(canvas, dtype=np.float32) / 255.0
    if image.channels == 1:
        # Fashion-MNIST shows a light object on a black background: invert photos of dark-on-light.
        if arr.mean() > 0.5:
            arr = 1.0 - arr
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))  # (C, H, W)


def load_images(paths, image: ImageSpec) -> torch.Tensor:
    return torch.stack([load_image(p, image) for p in paths])  # (N, C, H, W)
