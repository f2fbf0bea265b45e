"""The one validator of image batches handed to the library: (N, C, H, W) pixels, uint8 in [0, 255] or floats in
[0, 1] (normalisation belongs inside the model), optionally with as many labels as images."""

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import MapPruneError


def checked_images(images, labels=None, *, what: str = "images") -> torch.Tensor:
    """``images`` as a tensor, after checking shape, pixel range and (with ``labels``) the label count."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise MapPruneError(f"{what} must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not torch.is_floating_point(x) or (x.numel() and (x.min() < 0 or x.max() > 1)):
            raise MapPruneError(f"{what} must be uint8 in [0, 255] or floats in [0, 1] (not normalised: "
                                "normalisation belongs inside the model)")
    if labels is not None and (len(x) != len(labels) or len(x) == 0):
        raise MapPruneError(f"need as many labels as {what} (got {len(x)} {what}, {len(labels)} labels)")
    return x


def as_uint8(images, labels=None, *, what: str = "images") -> torch.Tensor:
    x = checked_images(images, labels, what=what)
    return x if x.dtype == torch.uint8 else x.mul(255).round_().to(torch.uint8)


def as_unit(images, labels=None, *, what: str = "images") -> torch.Tensor:
    """Float pixels in [0, 1]."""
    x = checked_images(images, labels, what=what)
    return x.float() / 255 if x.dtype == torch.uint8 else x


# The most pixels a trigger image file may declare (8192 x 8192), checked from its header before it is decoded: a
# small file can declare a huge image (a decompression bomb) whose decoding would take gigabytes.
MAX_IMAGE_PIXELS = 8192 * 8192


def read_image(path, channels: int, *, what: str = "image", size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as float pixels (channels, H, W) in [0, 1]: converted to grey (1 channel) or RGB (3);
    resized (bilinear) to ``size`` = (H, W) when given. A missing, unreadable or absurdly large file (more than
    ``MAX_IMAGE_PIXELS``) is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MapPruneError(f"{what} {path} does not exist")
    if channels not in (1, 3):
        raise MapPruneError(f"{what}: images with {channels} channels cannot be read from a picture file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused, not decoded
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise MapPruneError(f"{what} {path} declares {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                                        "an image file may have here (a damaged file or a decompression bomb); give "
                                        "a smaller image")
                im = im.convert("L" if channels == 1 else "RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MapPruneError(f"{what} {path} is too large to decode ({e}); give a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MapPruneError(f"cannot read {what} {path}: {e}") from None
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255
